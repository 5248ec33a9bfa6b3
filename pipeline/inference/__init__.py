"""Inference: from a trained bundle to captions, used by `evaluate`, `caption`, `serve` and the trainings'
validation alike.

* :mod:`~pipeline.inference.bundle`: the self-describing model bundle (save, load, ``Captioner``);
* :mod:`~pipeline.inference.decoding`: greedy, beam search, sampling and the caption modes;
* :mod:`~pipeline.inference.engine`: images -> captions with alternatives, scores, timings and attention
  (no web imports: the CLI and the server both use it);
* :mod:`~pipeline.inference.captioning`: `pipeline caption` over files and folders;
* :mod:`~pipeline.inference.attention_maps`: attention weights -> heatmaps.
"""
