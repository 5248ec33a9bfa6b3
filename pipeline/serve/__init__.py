"""The HTTP API and its page (`pipeline serve`), on top of :mod:`pipeline.inference.engine` (images ->
captions with alternatives, scores, timings and attention, which `pipeline caption` uses too):

* :mod:`pipeline.serve.batcher` an asyncio dynamic batcher: concurrent requests share one model call;
* :mod:`pipeline.serve.app`     the FastAPI app (``create_app``): ``POST /caption``, ``GET /health``, the page
  at ``/`` (``static/``, no remote assets) and offline OpenAPI docs;
* :mod:`pipeline.serve.settings` the server's options and their defaults, stated once.

Nothing heavy is imported here, so ``import pipeline.serve`` stays cheap.
"""
