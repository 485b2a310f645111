"""Trained drafters as data: the kinds (their modules and the loss each is trained with, kinds.py)
and the folder a trained drafter lives in (drafter.safetensors + drafter.json, store.py). The
drafter factory loads them; `selfspec train-drafter` (selfspec/train/) makes them."""
