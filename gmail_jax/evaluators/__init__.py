"""Evaluators: retrieval, zero-shot, modality gaps, clustering, plots."""
