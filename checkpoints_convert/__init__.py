"""Key and layout maps between diffusers/PyTorch checkpoints and helios-jax parameter trees."""
