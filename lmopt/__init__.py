"""Shared pieces of the pipeline: paths, manifests, errors, logging, models, engines, generation, NVTX.

Every stage script imports from here; this package has no CLI of its own.
"""
