"""Training data: raw videos + captions -> VAE latents and text embeddings stored as ArrayRecord shards
(`helios-jax prepare-data`), and the reading side those shards are opened through. The training loader
that turns stored clips into batches lives in helios_jax/training/data.py."""
