"""Image captioning from CLIP features: GPT-2 (NNX), ClipCap and DeCap, their caption sets and
the captioning evaluator. May import training (fit), evaluators, models, data; never experiments.
"""
