"""softmax(q k^T / sqrt(d)) v by name: the attention kernels every model uses, chosen by configuration.

Every attention of the models (the UNet's self- and cross-attention, the CLIP towers, the VAE, the DINO ViT) calls
``dot_product_attention`` with an ``implementation`` that its module is given (``attention_impl``):

- ``"xla"``: ``jax.nn.dot_product_attention``'s XLA composite; every backend.
- ``"cudnn"``: cuDNN's fused kernel (GPU, half precision; float32 inputs take ``"xla"``, which cuDNN does not take).
- ``"cpu"``: float32 through the fused C++ kernel of ``elite_jax.native`` (built on first use for this CPU's vector
  width; scores stay in cache), whose gradient XLA computes over blocks, recomputing the probabilities from the
  kernel's log-denominators (``_cpu_fused_grad``); other dtypes, machines where the kernel cannot be built, and
  machines where its self-check found it slower than XLA (``ELITE_JAX_NATIVE=auto``, ``native/selfcheck.py``) take
  matmuls over blocks of (batch x heads, queries) with 4-16 MB of scores each, the fastest form found in XLA alone
  (``_cpu_blocked``, BENCHMARKS.md); a causal attention (77 text tokens) takes ``"xla"``.
- ``"pallas"``: the Pallas TPU flash-attention kernel JAX ships (``jax.experimental.pallas.ops.tpu``), which never
  materialises the (Lq, Lk) scores: what keeps 512 px training on TPUs from holding 4096 x 4096 maps. It takes
  sequence lengths that are multiples of 128 and head dims up to 128 (or multiples of 128); other shapes (the
  77-token cross-attention, SD's 160-wide heads at 16 x 16) take ``"xla"``, whose maps are small there. Off a TPU it
  runs in Pallas' interpret mode (slow; for tests).
- ``"auto"`` (default): ``"cpu"`` on CPU, ``"pallas"`` on TPU, ``"xla"`` on GPU: by the platform the program is for
  (``target_platform``), which the training step's mesh names even when this host has no such device.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from elite_jax import native
from elite_jax.errors import InputError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "cpu", "pallas")
CPU_BLOCK_BYTES = 16 << 20  # the scores of one block of one head's queries in the CPU kernel (see _cpu_blocked)
CPU_GROUP_BYTES = 4 << 20  # ... and of a block that groups several heads
PALLAS_BLOCK = 128  # the TPU kernel's block (and lane) size


def check_implementation(name: str | None) -> str:
  """The name (None means "auto"), or an InputError for an unknown one."""
  name = "auto" if name is None else name
  if name not in IMPLEMENTATIONS:
    raise InputError(f"attention implementation {name!r} is not one of {IMPLEMENTATIONS}")
  return name


def target_platform() -> str:
  """The platform the program being traced is for: its mesh's devices' (``jax.sharding.use_abstract_mesh``, as the
  training step sets it), else this process's backend. They differ where a program is compiled here for devices
  this host does not have (train/plan.py: a TPU topology from a CPU host)."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def resolve(name: str | None, platform: str | None = None) -> str:
  """What ``"auto"`` means on ``platform`` (default: ``target_platform()``); other names unchanged."""
  name = check_implementation(name)
  if name != "auto":
    return name
  return {"cpu": "cpu", "tpu": "pallas"}.get(platform or target_platform(), "xla")


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
    if q.dtype == k.dtype == v.dtype == jnp.float32 and native.available():
      return _cpu_fused(q, k, v)
    return _cpu_blocked(q, k, v)
  if impl == "pallas" and _pallas_fits(q, k):
    return _pallas_flash(q, k, v, causal)
  if impl == "cudnn":
    if jax.default_backend() != "gpu":
      raise InputError(f"attention implementation 'cudnn' needs a CUDA GPU; this backend is {jax.default_backend()}")
    if q.dtype in (jnp.float16, jnp.bfloat16):
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal)


@jax.custom_vjp
def _cpu_fused(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The fused kernel (float32); its gradient is ``_cpu_fused_grad``'s."""
  return native.attention(q, k, v)[0]


def _cpu_fused_fwd(q, k, v):
  out, lse = native.attention(q, k, v)
  return out, (q, k, v, out, lse)


def _cpu_fused_bwd(res, g):
  return _cpu_fused_grad(*res, g)


_cpu_fused.defvjp(_cpu_fused_fwd, _cpu_fused_bwd)


def _cpu_fused_grad(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array, g: jax.Array,
                    block_bytes: int = CPU_BLOCK_BYTES, group_bytes: int | None = CPU_GROUP_BYTES):
  """(dq, dk, dv) of softmax(q k^T / sqrt(d)) v from the kernel's output and log-denominators (``lse``, (B, H, Lq)),
  over the blocks of ``_cpu_blocked``: each block's probabilities are recomputed from q, k and lse (FlashAttention's
  backward pass) rather than saved by the forward pass, which keeps the scores of every block in memory (tens of MB
  per layer at SD's shapes) between the two passes.
  dp = g v^T, ds = p (dp - rowsum(g * out)), dq = ds k / sqrt(d), dk = ds^T q / sqrt(d), dv = p^T g."""
  b, n, h, d = q.shape
  m = k.shape[1]
  bh = b * h
  scale = jnp.asarray(d ** -0.5, q.dtype)
  heads_first = lambda x: x.transpose(0, 2, 1, 3).reshape(bh, x.shape[1], x.shape[3])  # noqa: E731
  qt, kt, vt, gt = heads_first(q * scale), heads_first(k), heads_first(v), heads_first(g)
  lt = lse.reshape(bh, n)
  dt = jnp.einsum("bqhd,bqhd->bhq", g, out).reshape(bh, n)
  rows, group = _cpu_blocking(n, m, bh, q.dtype, block_bytes, group_bytes)

  def block(qc, kc, vc, gc, lc, dc):  # (G, c, d), (G, m, d), (G, m, dv), (G, c, dv), (G, c), (G, c)
    p = jnp.exp(jnp.einsum("gcd,gmd->gcm", qc, kc) - lc[..., None])
    ds = p * (jnp.einsum("gce,gme->gcm", gc, vc) - dc[..., None])
    return (jnp.einsum("gcm,gmd->gcd", ds, kc), jnp.einsum("gcm,gcd->gmd", ds, qc),
            jnp.einsum("gcm,gce->gme", p, gc))

  def heads(args):  # one group of heads; over its query blocks, dk and dv add up
    qg, kg, vg, gg, lg, dg = args
    if rows == n:
      return block(qg, kg, vg, gg, lg, dg)
    chunk = lambda x: x.reshape(group, n // rows, rows, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731

    def step(acc, xs):
      dq, dk, dv = block(xs[0], kg, vg, xs[1], xs[2], xs[3])
      return (acc[0] + dk, acc[1] + dv), dq
    (dk, dv), dq = jax.lax.scan(step, (jnp.zeros_like(kg), jnp.zeros_like(vg)),
                                (chunk(qg), chunk(gg), chunk(lg), chunk(dg)))
    return dq.swapaxes(0, 1).reshape(group, n, d), dk, dv

  args = (qt, kt, vt, gt, lt, dt)
  if group == bh:
    dq, dk, dv = heads(args)
  else:
    split = lambda x: x.reshape(bh // group, group, *x.shape[1:])  # noqa: E731
    dq, dk, dv = (x.reshape(bh, *x.shape[2:]) for x in jax.lax.map(heads, tuple(split(x) for x in args)))
  back = lambda x: x.reshape(b, h, *x.shape[1:]).transpose(0, 2, 1, 3)  # noqa: E731
  return back(dq) * scale, back(dk), back(dv)


def _cpu_blocking(n: int, m: int, bh: int, dtype, block_bytes: int, group_bytes: int | None) -> tuple[int, int]:
  """(queries per block, heads per block) of the CPU forms (see ``_cpu_blocked``)."""
  row_bytes = m * max(jnp.dtype(dtype).itemsize, 4)  # one query's scores (softmax math is at least float32 wide)
  rows = _divisor_at_most(n, max(1, block_bytes // row_bytes))
  group_bytes = block_bytes if group_bytes is None else group_bytes
  group = _divisor_at_most(bh, max(1, group_bytes // (row_bytes * rows))) if rows == n else 1
  return rows, group


def _cpu_blocked(q: jax.Array, k: jax.Array, v: jax.Array, block_bytes: int = CPU_BLOCK_BYTES,
                 group_bytes: int | None = CPU_GROUP_BYTES) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over blocks of queries of one head whose scores take about ``block_bytes`` or, when
  one head's scores take less, of several heads up to ``group_bytes`` (None: ``block_bytes``).

  Why this form (bench/bench_attention.py, BENCHMARKS.md): XLA:CPU neither fuses the softmax into the matmuls nor
  tiles them, so every block's (queries, keys) scores are written and read back. Blocks of 16 MB stay under glibc's
  32 MB mmap threshold (larger blocks are mapped and unmapped at every call: page faults, system time, a per-image
  cost that grows with the batch); 16 MB of one head's queries beat 1 and 4 MB at 4096 tokens, but blocks that
  group heads ran up to 5x slower at 16 MB than at 4 MB (SD's 8-wide heads at 1024 tokens). Batch and heads
  are one axis so the block size does not depend on the batch; the scale is folded into q (Lq x D multiplies
  instead of Lq x Lk) and the normalisation is applied after P @ V (Lq x Dv divides instead of Lq x Lk)."""
  b, n, h, d = q.shape
  m, dv = k.shape[1], v.shape[-1]
  bh = b * h
  qt = (q * jnp.asarray(d ** -0.5, q.dtype)).transpose(0, 2, 1, 3).reshape(bh, n, d)
  kt = k.transpose(0, 2, 3, 1).reshape(bh, d, m)
  vt = v.transpose(0, 2, 1, 3).reshape(bh, m, dv)
  rows, group = _cpu_blocking(n, m, bh, q.dtype, block_bytes, group_bytes)

  def block(qc, kc, vc):  # (g, c, d), (g, d, m), (g, m, dv)
    s = jnp.matmul(qc, kc)
    p = jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True)))
    return jnp.matmul(p, vc) / p.sum(-1, keepdims=True)

  def heads(args):  # one group of heads, its queries in blocks of ``rows``
    qg, kg, vg = args
    if rows == n:
      return block(qg, kg, vg)
    chunks = qg.reshape(group, n // rows, rows, d).swapaxes(0, 1)
    return jax.lax.map(lambda qc: block(qc, kg, vg), chunks).swapaxes(0, 1).reshape(group, n, dv)

  if group == bh:
    out = heads((qt, kt, vt))
  else:
    split = lambda x: x.reshape(bh // group, group, *x.shape[1:])  # noqa: E731
    out = jax.lax.map(heads, (split(qt), split(kt), split(vt))).reshape(bh, n, dv)
  return out.reshape(b, h, n, dv).transpose(0, 2, 1, 3)


def _divisor_at_most(n: int, k: int) -> int:
  """The largest divisor of n that is at most k (blocks must tile the axis exactly)."""
  for c in range(min(n, k), 0, -1):
    if n % c == 0:
      return c
  return 1


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
  # Mosaic's kernel where the program is for a TPU, Pallas' interpreter elsewhere (tests on a CPU). Mosaic refuses a
  # "highest" or "float32" matmul precision (the training step's default) on bf16 or fp16 operands ("Bad lhs type"):
  # there the kernel's products run at the default precision, exact for them (float32 accumulation) in any case.
  contexts = []
  if q.dtype != jnp.float32:
    contexts.append(lambda: jax.default_matmul_precision("default"))
  if target_platform() != "tpu":
    contexts.append(_interpret_mode)
  run = _within(contexts, flash) if contexts else flash
  # XLA cannot partition a Mosaic kernel: under a mesh (the training step's), each device runs it on its own
  # samples (and heads, over "tensor"), as a shard_map.
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return run(q, k, v)
  batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
  heads = "tensor" if "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1 else None
  if heads and q.shape[2] % mesh.shape[heads]:
    heads = None
  if batch and q.shape[0] % math.prod(mesh.shape[a] for a in batch):
    batch = ()
  spec = P(batch or None, None, heads, None)
  return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _interpret_mode():
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  return pltpu.force_tpu_interpret_mode()


def _within(contexts: list, fn):
  """``fn`` with every Pallas call it traces, its backward pass's included (traced later, by the caller's
  differentiation), inside the context managers ``contexts`` make."""
  def enter():
    stack = contextlib.ExitStack()
    for make in contexts:
      stack.enter_context(make())
    return stack

  @jax.custom_vjp
  def call(*args):
    with enter():
      return fn(*args)

  def fwd(*args):
    with enter():
      return jax.vjp(fn, *args)

  def bwd(vjp_fn, g):
    with enter():
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
