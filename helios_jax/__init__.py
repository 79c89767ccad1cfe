"""helios-jax: Helios, the autoregressive video diffusion transformer, in JAX/Flax."""
from helios_jax.loading import load
from helios_jax.sampling.pipeline import HeliosPipeline

__version__ = "0.1.0"
__all__ = ["HeliosPipeline", "load", "__version__"]
