"""Trained drafters (issue #10): self-distillation data (`data`), the trainable kinds (`kinds`),
the training loop with checkpoints (`loop`) and the on-disk format (`store`)."""
