"""helios-jax: Helios, the autoregressive video diffusion transformer, in JAX/Flax."""
from helios_jax.loading import load

__version__ = "0.1.0"
__all__ = ["load", "__version__"]
