"""Trained drafters (heads trained on the model's own outputs, for higher acceptance than the
training-free drafters): self-distillation data (`data`), the trainable kinds (`kinds`),
the training loop with checkpoints (`loop`) and the on-disk format (`store`)."""
