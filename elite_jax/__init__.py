"""elite-jax: ELITE (Wei et al., ICCV 2023) in JAX/Flax."""

from elite_jax import runtime as _runtime

__version__ = "0.1.0"

# Before any JAX backend starts: XLA reads its flags once (runtime.py says which and why).
_runtime.set_xla_flags()
