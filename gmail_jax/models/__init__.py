"""Towers by name (CLIP, SigLIP; Long-CLIP context; OpenAI / OpenCLIP import), LoRA, layers,
weight conversion and tokenizers. May import data (preprocessing constants) and errors only.
"""
