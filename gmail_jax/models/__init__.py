"""CLIP towers, LoRA, weight conversion and tokenizer."""
