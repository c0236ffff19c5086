"""Evaluators: retrieval, zero-shot, modality gaps, clustering, probe, captioning metrics,
regression, plots; each over the encoder interface of evaluators/common.py.
May import data, models, errors; never training, captioning or anything above.
"""
