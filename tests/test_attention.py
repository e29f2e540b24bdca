"""Every attention implementation that runs on a CPU against the plain formula, float32 and bfloat16.

"xla" is what GPUs run (and what every other implementation falls back to); "pallas" is the TPU flash-attention kernel
JAX ships, run here in Pallas' interpret mode (the same kernel code, interpreted); "cpu" is the fused C++ kernel in
float32 (tests/test_native.py tests it further) and the blocked XLA form in bfloat16 (and in
test_cpu_blocks_tile_exactly).
"cudnn" needs a CUDA GPU: on a CPU it must refuse with a clear error (its numerics are checked on a GPU by
bench/gpu_run.sh's runs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elite_jax.errors import InputError
from elite_jax.models import attention

RUNNABLE = ("xla", "cpu", "pallas", "auto")
# Shapes: SD's 40-wide heads over 256 tokens (the CPU kernel's chunked path, Pallas' blocks), a 77-token
# cross-attention (Pallas falls back to XLA there) and 128-wide heads.
SHAPES = [((2, 256, 2, 40), 256), ((2, 256, 2, 40), 77), ((1, 128, 2, 128), 128)]


def plain(q, k, v, causal):
  """softmax(q k^T / sqrt(d)) v in float64 numpy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def _inputs(shape, kv_len, dtype, seed=0):
  rng = np.random.default_rng(seed)
  b, lq, h, d = shape
  q = rng.standard_normal((b, lq, h, d))
  k, v = rng.standard_normal((2, b, kv_len, h, d))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("impl", RUNNABLE)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape,kv_len", SHAPES)
def test_matches_the_plain_formula(impl, dtype, tol, shape, kv_len):
  q, k, v = _inputs(shape, kv_len, dtype)
  for causal in (False, True) if kv_len == shape[1] else (False,):
    got = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=impl, causal=causal))(
        q, k, v)
    assert got.dtype == dtype and got.shape == shape
    assert _rel(got, plain(q, k, v, causal)) < tol, (impl, causal)


def test_upcast_computes_in_float32():
  q, k, v = _inputs((2, 256, 2, 40), 256, jnp.bfloat16)
  want = plain(q, k, v, False)
  for impl in RUNNABLE:
    got = attention.dot_product_attention(q, k, v, implementation=impl, upcast=True)
    assert got.dtype == jnp.bfloat16
    # float32 inside: only the final bfloat16 rounding (2^-8 relative) remains
    assert _rel(got, want) < 8e-3, impl


@pytest.mark.parametrize("impl", ("xla", "cpu", "pallas"))
def test_gradients_match(impl):
  """Training differentiates through the kernel (Pallas' flash attention has its own backward pass)."""
  q, k, v = _inputs((1, 256, 2, 40), 256, jnp.float32, seed=1)
  weights = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

  def ref_loss(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(q.shape[-1]), -1)
    return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", p, v, precision="highest") * weights)

  loss = lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, implementation=impl) * weights)
  got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert _rel(g, w) < 1e-5


# Block sizes that make the CPU kernel loop over query chunks (32 queries), over head groups (2 of 4 heads), both
# at once in a head group, and over 77-key blocks whose query count 256 has no divisor near the target.
@pytest.mark.parametrize("block_bytes,kv_len", [(256 * 4 * 32, 256), (256 * 4 * 256 * 2, 256), (77 * 4 * 100, 77)])
def test_cpu_blocks_tile_exactly(block_bytes, kv_len):
  q, k, v = _inputs((2, 256, 2, 40), kv_len, jnp.float32, seed=3)
  weights = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
  got = jax.jit(lambda q, k, v: attention._cpu_blocked(q, k, v, block_bytes, block_bytes))(q, k, v)
  assert _rel(got, plain(q, k, v, False)) < 2e-6
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * weights)  # noqa: E731
  got = jax.grad(loss(lambda q, k, v: attention._cpu_blocked(q, k, v, block_bytes, block_bytes)),
                 argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation="xla")),
                  argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert _rel(g, w) < 1e-5


def test_choice_by_backend_and_bad_names():
  assert attention.resolve("auto") == attention.resolve(None) == "cpu"  # this suite runs on the CPU backend
  assert attention.resolve("xla") == "xla"
  q, k, v = _inputs((1, 128, 2, 40), 128, jnp.bfloat16)
  with pytest.raises(InputError, match="'cudnn' needs a CUDA GPU"):
    attention.dot_product_attention(q, k, v, implementation="cudnn")
  with pytest.raises(InputError, match="not one of"):
    attention.dot_product_attention(q, k, v, implementation="flash")
