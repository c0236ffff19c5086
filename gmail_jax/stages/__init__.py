"""The stages of an experiment, one module each (registry and driver: gmail_jax/experiment.py)."""
