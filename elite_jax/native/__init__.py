"""Native CPU kernels: C++ XLA FFI handlers (``jax.ffi``), built with the machine's C++ compiler on first use.

Why: XLA:CPU has no fused attention, so every softmax(q k^T) v writes its scores to memory and reads them back; the
fused kernel here (``attention_cpu.cc``) keeps them in cache and ran SD's self-attention shapes 1.3-2.0x faster than
the best XLA form (BENCHMARKS.md, "Fused CPU attention"). Why built on first use: the handler is compiled against the
installed jaxlib's FFI headers (``jax.ffi.include_dir()``) and for this CPU (``-march=native``), which a wheel built
elsewhere could not be; the build takes a few seconds, once per machine, jaxlib and source.

Where: ``$ELITE_JAX_NATIVE_DIR``, else ``$XDG_CACHE_HOME/elite_jax/native`` (``~/.cache/elite_jax/native``), one
library per (source, jaxlib, compiler, CPU) key, written atomically (several processes may build at once).
``ELITE_JAX_NATIVE=0`` turns the kernels off. The compiler is ``$CXX``, else ``c++``. Without one, or when the
build fails, the callers keep their XLA forms and one warning says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

DIR_ENV = "ELITE_JAX_NATIVE_DIR"
OFF_ENV = "ELITE_JAX_NATIVE"
ATTENTION_TARGET = "elite_cpu_attention"
_SOURCE = os.path.join(os.path.dirname(__file__), "attention_cpu.cc")
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")
_lock = threading.Lock()


def enabled() -> bool:
  """False when ``ELITE_JAX_NATIVE`` is 0 (or off/false/no)."""
  return os.environ.get(OFF_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def native_dir() -> str:
  if os.environ.get(DIR_ENV):
    return os.path.expanduser(os.environ[DIR_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "elite_jax", "native")


def _compiler() -> str | None:
  return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _cpu_identity() -> str:
  """What -march=native depends on: a library built on one CPU may not run on another (a shared home folder)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "".join(sorted(set(lines)))
  except OSError:
    import platform  # noqa: PLC0415 - only where /proc is missing
    return platform.processor() + platform.machine()


def _key(compiler: str) -> str:
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
  with open(_SOURCE, "rb") as f:
    source = f.read()
  parts = [source, importlib.metadata.version("jaxlib").encode(), version.encode(), " ".join(_FLAGS).encode(),
           _cpu_identity().encode()]
  return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def build() -> str:
  """The path of the attention library, compiled now unless this key's is already there; raises RuntimeError with
  the compiler's message when it cannot be built."""
  compiler = _compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler (set CXX, or install g++)")
  folder = native_dir()
  path = os.path.join(folder, f"attention_cpu-{_key(compiler)}.so")
  if os.path.exists(path):
    return path
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
  os.close(fd)
  cmd = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    os.unlink(tmp)
    message = (done.stderr.strip().splitlines() or ["no message"])[-1]
    raise RuntimeError(f"{os.path.basename(compiler)} failed ({message})")
  os.replace(tmp, path)  # atomic: a concurrent process sees the old state or the whole library
  return path


@functools.cache
def _registered() -> str | None:
  """Builds, loads and registers the handlers once per process: None when they are in place, else the reason."""
  if jax.default_backend() != "cpu":
    return "the default backend is not the CPU"
  try:
    lib = ctypes.CDLL(build())
  except (RuntimeError, OSError) as e:
    return str(e)
  jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.EliteCpuAttention), platform="cpu")
  _libraries.append(lib)  # keep it loaded for as long as XLA may call it
  return None


_libraries: list[ctypes.CDLL] = []


def available() -> bool:
  """Whether the native kernels can be called in this process (built, loaded, registered); warns once if not."""
  if not enabled():
    return False
  with _lock:
    reason = _registered()
  if reason is not None:
    _warn_once(reason)
  return reason is None


@functools.cache
def _warn_once(reason: str) -> None:
  warnings.warn(f"elite_jax: native CPU kernels unavailable ({reason}); using the XLA forms", stacklevel=3)


@jax.custom_batching.custom_vmap
def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """softmax(q k^T / sqrt(d)) v on float32 (B, L, H, D) arrays through the fused kernel (``available()`` first),
  and the log of every softmax denominator (B, H, Lq), with the scores scaled (what a backward pass needs).

  Under a sharded ``jit`` the kernel runs on each device's batch rows and heads (``custom_partitioning``); the
  partitioner would otherwise gather whole arrays onto every device and repeat the work there. Under ``vmap`` the
  mapped axis joins the batch axis."""
  return _partitioned(q, k, v)


@attention.def_vmap
def _attention_vmap(axis_size, in_batched, q, k, v):
  q, k, v = (x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, batched in zip((q, k, v), in_batched))
  fold = lambda x: x.reshape(axis_size * x.shape[1], *x.shape[2:])  # noqa: E731
  out, lse = attention(fold(q), fold(k), fold(v))
  unfold = lambda x: x.reshape(axis_size, x.shape[0] // axis_size, *x.shape[1:])  # noqa: E731
  return (unfold(out), unfold(lse)), (True, True)


def _call(q, k, v):
  out = jax.ShapeDtypeStruct(q.shape[:-1] + v.shape[-1:], q.dtype)
  lse = jax.ShapeDtypeStruct(q.shape[:-3] + (q.shape[-2], q.shape[-3]), jnp.float32)
  return jax.ffi.ffi_call(ATTENTION_TARGET, (out, lse))(q, k, v)


@custom_partitioning
def _partitioned(q, k, v):
  return _call(q, k, v)


def _shardings(mesh, q_sharding):
  """Batch and heads as q has them, the rest whole: ((q, k, v), (out, lse)) shardings."""
  spec = tuple(getattr(q_sharding, "spec", ())) + (None,) * 4
  b, h = spec[0], spec[2]
  arg = NamedSharding(mesh, P(b, None, h, None))
  return (arg, arg, arg), (arg, NamedSharding(mesh, P(b, h, None)))


def _partition(mesh, arg_shapes, result_shape):
  args, outs = _shardings(mesh, arg_shapes[0].sharding)
  return mesh, _call, outs, args


def _infer(mesh, arg_shapes, result_shape):
  return _shardings(mesh, arg_shapes[0].sharding)[1]


_partitioned.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                           sharding_rule="b q h d, b k h d, b k h e -> b q h e, b h q",
                           need_replication_factors=("q", "d", "k", "e"))  # in order of first use
