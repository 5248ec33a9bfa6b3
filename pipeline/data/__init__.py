"""Datasets: importers for each source format, the synthetic world, robust image decoding.

Every importer produces the one manifest schema defined in :mod:`pipeline.data.manifest`.
"""
