"""softmax(q k^T / sqrt(d)) v by name: the attention kernels every model uses, chosen by configuration.

Every attention of the models (the UNet's self- and cross-attention, the CLIP towers, the VAE, the DINO ViT) calls
``dot_product_attention`` with an ``implementation`` that its module is given (``attention_impl``):

- ``"xla"``: ``jax.nn.dot_product_attention``'s XLA composite; every backend.
- ``"cudnn"``: cuDNN's fused kernel (GPU, half precision; float32 inputs take ``"xla"``, which cuDNN does not take).
- ``"cpu"``: heads-major matmuls over 64-query chunks, the fastest form on XLA:CPU (BENCHMARKS.md); a causal
  attention (77 text tokens) takes ``"xla"``.
- ``"pallas"``: the Pallas TPU flash-attention kernel JAX ships (``jax.experimental.pallas.ops.tpu``), which never
  materialises the (Lq, Lk) scores: what keeps 512 px training on TPUs from holding 4096 x 4096 maps. It takes
  sequence lengths that are multiples of 128 and head dims up to 128 (or multiples of 128); other shapes (the
  77-token cross-attention, SD's 160-wide heads at 16 x 16) take ``"xla"``, whose maps are small there. Off a TPU it
  runs in Pallas' interpret mode (slow; for tests).
- ``"auto"`` (default): ``"cpu"`` on CPU, ``"pallas"`` on TPU, ``"xla"`` on GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from elite_jax.errors import InputError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "cpu", "pallas")
CPU_CHUNK = 64  # queries per block of the CPU kernel
PALLAS_BLOCK = 128  # the TPU kernel's block (and lane) size


def check_implementation(name: str | None) -> str:
  """The name (None means "auto"), or an InputError for an unknown one."""
  name = "auto" if name is None else name
  if name not in IMPLEMENTATIONS:
    raise InputError(f"attention implementation {name!r} is not one of {IMPLEMENTATIONS}")
  return name


def resolve(name: str | None) -> str:
  """What ``"auto"`` means on this backend; other names unchanged."""
  name = check_implementation(name)
  if name != "auto":
    return name
  return {"cpu": "cpu", "tpu": "pallas"}.get(jax.default_backend(), "xla")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str | None = "auto",
                          causal: bool = False, upcast: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v on (B, L, H, D) tensors, by ``implementation`` (see the module docstring).

  ``upcast`` computes in float32 whatever the input dtype (diffusers' ``upcast_attention``/``upcast_softmax``, which
  SD 2.1 needs in half precision and the VAE always sets); the result has q's dtype.
  """
  if upcast and q.dtype != jnp.float32:
    out = dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                implementation=implementation, causal=causal)
    return out.astype(q.dtype)
  impl = resolve(implementation)
  if impl == "cpu" and not causal:
    return _cpu_chunked(q, k, v)
  if impl == "pallas" and _pallas_fits(q, k):
    return _pallas_flash(q, k, v, causal)
  if impl == "cudnn":
    if jax.default_backend() != "gpu":
      raise InputError(f"attention implementation 'cudnn' needs a CUDA GPU; this backend is {jax.default_backend()}")
    if q.dtype in (jnp.float16, jnp.bfloat16):
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal)


def _cpu_chunked(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int = CPU_CHUNK) -> jax.Array:
  """Heads-major matmuls over 64-query chunks: XLA:CPU runs jax.nn.dot_product_attention's composite slowly (2 x 4096
  tokens, 8 heads of 40: 1050 ms as (B, N, H, D) einsums, 660 ms like this; the whole 4096 x 4096 map would also be
  1 GB)."""
  b, n, h, d = q.shape
  qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, H, N, D)
  scale = jnp.asarray(d ** -0.5, q.dtype)

  def block(qc):
    probs = jax.nn.softmax(jnp.matmul(qc, kt.swapaxes(-1, -2)) * scale, axis=-1)
    return jnp.matmul(probs, vt)
  if n <= 2 * chunk or n % chunk:
    out = block(qt)
  else:
    out = jax.lax.map(block, qt.reshape(b, h, n // chunk, chunk, d).transpose(2, 0, 1, 3, 4))
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, h, n, v.shape[-1])
  return out.transpose(0, 2, 1, 3)


def _pallas_fits(q: jax.Array, k: jax.Array) -> bool:
  d = q.shape[-1]
  return (q.shape[1] % PALLAS_BLOCK == 0 and k.shape[1] % PALLAS_BLOCK == 0 and k.shape[-1] == d
          and (d <= PALLAS_BLOCK or d % PALLAS_BLOCK == 0))


def _pallas_flash(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # noqa: PLC0415 - loads Mosaic: only when asked

  def flash(q, k, v):  # the kernel's layout is (B, H, L, D)
    out = fa.flash_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                             causal=causal, sm_scale=q.shape[-1] ** -0.5)
    return out.transpose(0, 2, 1, 3)
  return flash(q, k, v) if jax.default_backend() == "tpu" else _interpreted(flash)(q, k, v)


def _interpreted(fn):
  """``fn`` with every Pallas call it traces, its backward pass's included, in TPU interpret mode (off a TPU)."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

  @jax.custom_vjp
  def call(*args):
    with pltpu.force_tpu_interpret_mode():
      return fn(*args)

  def fwd(*args):
    with pltpu.force_tpu_interpret_mode():
      return jax.vjp(fn, *args)

  def bwd(vjp_fn, g):
    with pltpu.force_tpu_interpret_mode():
      return vjp_fn(g)
  call.defvjp(fwd, bwd)
  return call


def split_heads(x: jax.Array, heads: int) -> jax.Array:
  """(B, L, heads*d) -> (B, L, heads, d), the layout of dot_product_attention."""
  b, l, c = x.shape
  return x.reshape(b, l, heads, c // heads)


def merge_heads(x: jax.Array) -> jax.Array:
  b, l, h, d = x.shape
  return x.reshape(b, l, h * d)


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """Scaled scores (B, H, Lq, Lk), computed as the official ELITE code does: matmul, then * d^-0.5."""
  scale = q.shape[-1] ** -0.5
  return jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(scale, q.dtype)
