"""Sampling: conditioning latents (and, later, schedulers, pyramid resampling and the pipeline)."""
