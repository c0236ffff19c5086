"""Training: the trainer (mesh -> data -> model -> restore -> loop), the pure step, build (frozen
teacher + LoRA student + optimizer), optim, checkpointing, sharding, teacher cache, metrics writer,
the encoders evaluation runs, and small in-memory fits (fit, contrastive).
May import schema, models, data, objectives, evaluators; never experiments, stages or export.
"""
