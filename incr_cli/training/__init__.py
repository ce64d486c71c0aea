"""training: the one training loop every method runs: masking, loss terms, the learning-rate schedule,
the plan and budget, one step (``step.py``) and the resumable state (``checkpointing.py``)."""
