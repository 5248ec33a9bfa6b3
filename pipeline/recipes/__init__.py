"""Recipes: the reference architectures at their published sizes (:mod:`~pipeline.recipes.presets`) and the
dataset recipes run as DVC projects of their own (:mod:`~pipeline.recipes.project`)."""
