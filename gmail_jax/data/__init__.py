"""Input side: sources, pairing, CLIP preprocessing, Grain pipeline, bad-input policy."""
