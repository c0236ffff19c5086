"""Input side: sources, pairing, CLIP preprocessing, Grain pipeline, bad-input policy, prepare.
The bottom of the chain: imports only errors (never models, training or anything above).
"""
