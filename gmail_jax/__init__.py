"""gmail_jax: GMAIL (generated images as their own modality) and TPC-CMA in JAX/Flax NNX."""

__version__ = "0.1.0"
