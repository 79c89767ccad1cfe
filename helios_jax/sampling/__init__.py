"""Sampling: the pipeline (`pipeline.py`, `HeliosPipeline`), the jitted chunk program
(`rollout.py`) and its plan (`chunk_plan.py`), the Helios schedulers (host tables + pure jnp steps),
pyramid resampling, guidance, conditioning latents, and where the components run (`placement.py`,
`mesh_choice.py`, `memory_plan.py`)."""
