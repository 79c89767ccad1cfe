"""Sampling: conditioning latents, the Helios schedulers (host tables + pure jnp steps), and,
later, pyramid resampling and the pipeline."""
