"""Learning from operator labels: the training set, scheduled and manual retraining runs in their own
process (CLIP prompts and heads, and the real-weights head), the promotion gate, and the model-version registry with
activation, rollback and hot swap.

Owns: retraining.py, retraining_job.py, head_retraining.py, head_retraining_job.py, supervisor.py, runs.py,
training_set.py, promotion.py, versions.py. May import: model, adapters, daemon.config, daemon.detectors,
daemon.references.
"""
