"""Stable Diffusion in Flax NNX for the JAX generation backend: UNet2DConditionModel (unet.py),
the AutoencoderKL decoder (vae.py), the text encoder over our CLIP text tower (text_encoder.py),
schedulers as pure functions of arrays (schedulers.py), weights from a diffusers directory.
Like the rest of models/: imports data and errors only (numpy / safetensors for weights).
"""
