"""Image captioning from CLIP features: ClipCap and DeCap on a GPT-2 decoder."""
