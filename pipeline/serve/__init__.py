"""Captioning for people: the model side shared by `pipeline caption` and `pipeline serve`, the HTTP API and its page.

* :mod:`pipeline.serve.engine`  images -> captions with alternatives, scores, timings and attention heatmaps
  (no web imports: the CLI uses it too);
* :mod:`pipeline.serve.batcher` an asyncio dynamic batcher: concurrent requests share one model call;
* :mod:`pipeline.serve.app`     the FastAPI app (``create_app``): ``POST /caption``, ``GET /health``, the page
  at ``/`` (``static/``, no remote assets) and offline OpenAPI docs.

Nothing heavy is imported here, so ``import pipeline.serve`` stays cheap.
"""
