"""Generation: captions -> generated images and their manifest. config (checks + plan), captions,
seeds, store (chunks, journal, atomic parts, manifest), runner, importer, and one module per
backend (diffusers_backend.py: the only one that imports torch, lazily).
May import schema, data, models, errors; never training, experiments or export.
"""
