"""elite-jax: ELITE (Wei et al., ICCV 2023) in JAX/Flax."""

__version__ = "0.1.0"
