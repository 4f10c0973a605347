"""fitv2-jax: FiTv2 diffusion transformers in JAX/Flax."""

__version__ = "0.1.0"
