"""Training: LoRA, history augmentation, the Stage-1 / Stage-2 losses and the train loop."""
