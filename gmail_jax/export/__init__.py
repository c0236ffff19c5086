"""Export of a trained run: a transformers directory (hf_dir.py), a PEFT LoRA adapter
(peft_adapter.py), and ``python -m gmail_jax.export`` (exporter.py, __main__.py).
May import run, training, models, errors; never experiments.
"""
