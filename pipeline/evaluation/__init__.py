"""Evaluation: the COCO caption metrics (:mod:`~pipeline.evaluation.metrics`), the HTML gallery
(:mod:`~pipeline.evaluation.gallery`) and plots (:mod:`~pipeline.evaluation.plots`)."""
