"""Native CPU kernels: C++ XLA FFI handlers (``jax.ffi``), built with the machine's C++ compiler on first use.

Why: XLA:CPU has no fused attention, so every softmax(q k^T) v writes its scores to memory and reads them back; the
fused kernel here (``attention_cpu.cc``) keeps them in cache (BENCHMARKS.md, "CPU speed on every x86 CPU"). Why
built on first use: the handler is compiled against the installed jaxlib's FFI headers (``jax.ffi.include_dir()``)
and for this CPU (``-march=native``: its vector width and register count set the kernel's blocking), which a wheel
built elsewhere could not be; the build takes a few seconds, once per machine, jaxlib and source.

Settings (environment):

- ``ELITE_JAX_NATIVE``: ``auto`` (default) uses the kernel where it is faster than the XLA form on this machine, as
  timed once next to the build (``selfcheck.py``; on AVX-512 CPUs the AVX2 build is timed too and the faster one
  used); ``1`` always uses the ``ELITE_JAX_NATIVE_ARCH`` build, ``0`` never.
- ``ELITE_JAX_NATIVE_ARCH``: the compiler's target, ``native`` (default), ``x86-64-v3`` (AVX2), ``x86-64-v4``
  (AVX-512), ``generic`` (the compiler's default target: SSE2 on x86-64, NEON on aarch64) or any ``-march`` value.
- ``ELITE_JAX_NATIVE_DIR``: where libraries go, else ``$XDG_CACHE_HOME/elite_jax/native``
  (``~/.cache/elite_jax/native``): one library per (source, jaxlib, compiler, flags, CPU) key, written atomically
  (several processes may build at once).
- ``CXX``: the compiler, else ``c++``. Without one, or when the build fails, the callers keep their XLA forms and
  one warning says why.
"""

from __future__ import annotations

import ctypes
import dataclasses
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

from elite_jax.errors import InputError

DIR_ENV = "ELITE_JAX_NATIVE_DIR"
MODE_ENV = "ELITE_JAX_NATIVE"
OFF_ENV = MODE_ENV  # ELITE_JAX_NATIVE=0 turns the kernels off
ARCH_ENV = "ELITE_JAX_NATIVE_ARCH"
ATTENTION_TARGET = "elite_cpu_attention"  # the prefix of every registered build's FFI target
ARCHS = ("native", "x86-64-v3", "x86-64-v4", "generic")  # the named targets; any other -march value is passed on
WIDTHS = (4, 8, 16)  # vector widths the source can be forced to (-DELITE_ATTENTION_WIDTH)
_SOURCE = os.path.join(os.path.dirname(__file__), "attention_cpu.cc")
_FLAGS = ("-O3", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")
_MODES = {"auto": "auto", "": "auto", "1": "on", "on": "on", "true": "on", "yes": "on",
          "0": "off", "off": "off", "false": "off", "no": "off"}
# What each x86-64 level needs of /proc/cpuinfo's flags (the psABI levels; abm is how Linux names lzcnt).
_X86_LEVELS = {"x86-64-v3": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "abm", "xsave"},
               "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}}
_lock = threading.Lock()


def mode() -> str:
  """``auto``, ``on`` or ``off``, from ``ELITE_JAX_NATIVE``; an InputError names a value that is none of them."""
  value = os.environ.get(MODE_ENV, "auto").strip().lower()
  if value not in _MODES:
    raise InputError(f"{MODE_ENV}={value!r} is not one of auto, 1, 0")
  return _MODES[value]


def enabled() -> bool:
  """False when ``ELITE_JAX_NATIVE`` is 0 (or off/false/no)."""
  return mode() != "off"


def arch() -> str:
  """The compiler target of the default build (``ELITE_JAX_NATIVE_ARCH``, else ``native``)."""
  value = os.environ.get(ARCH_ENV, "native").strip() or "native"
  if not all(ch.isalnum() or ch in "-_.+" for ch in value):
    raise InputError(f"{ARCH_ENV}={value!r} is not a compiler target (native, x86-64-v3, x86-64-v4, generic)")
  return value


def native_dir() -> str:
  if os.environ.get(DIR_ENV):
    return os.path.expanduser(os.environ[DIR_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "elite_jax", "native")


def _compiler() -> str | None:
  return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def cpu_info() -> dict:
  """This CPU's model name and /proc/cpuinfo flags (empty where there is no /proc)."""
  info = {"model": "", "flags": set()}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "CPU part") and not info["model"]:
          info["model"] = value.strip()
        elif key in ("flags", "Features"):
          info["flags"] |= set(value.split())
  except OSError:
    import platform  # noqa: PLC0415 - only where /proc is missing
    info["model"] = platform.processor() or platform.machine()
  return info


def supported_archs() -> tuple[str, ...]:
  """The named targets whose code this CPU can run: ``native`` and ``generic`` always, the x86-64 levels by flags."""
  flags, levels, need = cpu_info()["flags"], [], set()
  for name, extra in _X86_LEVELS.items():  # each level includes the one before it
    need |= extra
    if not need <= flags:
      break
    levels.append(name)
  return ("native", *levels, "generic")


def _cpu_identity() -> str:
  """What -march=native depends on: a library built on one CPU may not run on another (a shared home folder)."""
  info = cpu_info()
  return info["model"] + " " + " ".join(sorted(info["flags"]))


def _flags(target: str, width: int | None, copy: bool | None = None) -> list[str]:
  flags = list(_FLAGS)
  if target != "generic":
    flags.append(f"-march={target}")
  if width is not None:
    if width not in WIDTHS:
      raise ValueError(f"vector width {width} is not one of {WIDTHS}")
    flags.append(f"-DELITE_ATTENTION_WIDTH={width}")
  if copy is not None:
    flags.append(f"-DELITE_ATTENTION_COPY={int(copy)}")
  return flags


def _key(compiler: str, flags: list[str]) -> str:
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
  with open(_SOURCE, "rb") as f:
    source = f.read()
  parts = [source, importlib.metadata.version("jaxlib").encode(), version.encode(), " ".join(flags).encode(),
           _cpu_identity().encode()]
  return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def build(target: str | None = None, width: int | None = None, copy: bool | None = None) -> str:
  """The path of the attention library for ``target`` (default ``arch()``), ``width`` (default the target's own)
  and ``copy`` (whether each head's keys and values are copied to contiguous rows first; default: by their size
  against the L2 cache), compiled now unless this key's is already there; raises RuntimeError with the compiler's
  message when it cannot be built."""
  compiler = _compiler()
  if compiler is None:
    raise RuntimeError("no C++ compiler (set CXX, or install g++)")
  flags = _flags(target or arch(), width, copy)
  folder = native_dir()
  path = os.path.join(folder, f"attention_cpu-{_key(compiler, flags)}.so")
  if os.path.exists(path):
    return path
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
  os.close(fd)
  cmd = [compiler, *flags, "-isystem", jax.ffi.include_dir(), _SOURCE, "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    os.unlink(tmp)
    message = (done.stderr.strip().splitlines() or ["no message"])[-1]
    raise RuntimeError(f"{os.path.basename(compiler)} failed ({message})")
  os.replace(tmp, path)  # atomic: a concurrent process sees the old state or the whole library
  return path


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One loaded build of the attention kernel: its library, FFI target, compiler target and blocking."""
  path: str
  target: str  # the FFI target name it is registered under
  arch: str
  width: int  # floats per vector
  queries: int  # queries per block
  keys: int  # keys per tile
  copy: int  # heads' keys and values copied to rows of their own: -1 by size (the default), 0 never, 1 always

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(out, lse) of float32 (B, L, H, D) arrays on one device (no partitioning rule, no vmap rule)."""
    return _call(self.target, q, k, v)

  def describe(self) -> str:
    return f"{self.arch}, {self.width} floats per vector, blocks of {self.queries} queries x {self.keys} keys"


_libraries: list[ctypes.CDLL] = []  # kept loaded for as long as XLA may call them


@functools.cache
def load(target: str | None = None, width: int | None = None, copy: bool | None = None) -> Kernel:
  """Builds (or finds), loads and registers one build of the kernel (``build``'s arguments), once per process;
  RuntimeError if it cannot be built or loaded."""
  target = target or arch()
  if jax.default_backend() != "cpu":
    raise RuntimeError("the default backend is not the CPU")
  path = build(target, width, copy)
  try:
    lib = ctypes.CDLL(path)
  except OSError as e:
    raise RuntimeError(str(e)) from e
  lib.EliteCpuAttentionConfig.restype = ctypes.c_char_p
  config = dict(item.split("=") for item in lib.EliteCpuAttentionConfig().decode().split())
  name = f"{ATTENTION_TARGET}_{os.path.basename(path)[len('attention_cpu-'):-3]}"
  jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(lib.EliteCpuAttention), platform="cpu")
  _libraries.append(lib)
  return Kernel(path, name, target, int(config["width"]), int(config["queries"]), int(config["keys"]),
                int(config["copy"]))


@functools.cache
def _default() -> Kernel | str:
  """The default build, or the reason it cannot be had (warned once)."""
  try:
    return load()
  except RuntimeError as e:
    warnings.warn(f"elite_jax: native CPU kernels unavailable ({e}); using the XLA forms", stacklevel=4)
    return str(e)


def kernel() -> Kernel | None:
  """The default build (``ELITE_JAX_NATIVE_ARCH``), loaded; None (after one warning) where it cannot be built."""
  with _lock:
    got = _default()
  return got if isinstance(got, Kernel) else None


def active() -> Kernel | None:
  """The build the "cpu" attention calls: the default one (``kernel()``), or under ``auto`` the one the self-check
  chose (the AVX2 build, where it was faster than the native one)."""
  default = kernel()
  if default is None or mode() != "auto":
    return default
  from elite_jax.native import selfcheck  # noqa: PLC0415 - see available()
  return selfcheck.chosen_build(selfcheck.choice(), default)


def available() -> bool:
  """Whether the "cpu" attention should call the kernel in this process: it is built and loaded, and either
  ``ELITE_JAX_NATIVE=1`` or, under ``auto``, this machine's self-check found it faster than the XLA form."""
  if mode() == "off" or kernel() is None:
    return False
  if mode() == "on":
    return True
  from elite_jax.native import selfcheck  # noqa: PLC0415 - it times the models' XLA form, which imports this module
  return selfcheck.choice().use_kernel


@jax.custom_batching.custom_vmap
def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """softmax(q k^T / sqrt(d)) v on float32 (B, L, H, D) arrays through the default build of the fused kernel, and
  the log of every softmax denominator (B, H, Lq), with the scores scaled (what a backward pass needs).

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


def _call(target, q, k, v):
  out = jax.ShapeDtypeStruct(q.shape[:-1] + v.shape[-1:], q.dtype)
  lse = jax.ShapeDtypeStruct(q.shape[:-3] + (q.shape[-2], q.shape[-3]), jnp.float32)
  return jax.ffi.ffi_call(target, (out, lse))(q, k, v)


def _call_default(q, k, v):
  got = active()
  if got is None:
    raise RuntimeError(f"the native attention kernel could not be built ({_default()})")
  return got(q, k, v)


@custom_partitioning
def _partitioned(q, k, v):
  return _call_default(q, k, v)


def _shardings(mesh, q_sharding):
  """Batch and heads as q has them, the rest whole: ((q, k, v), (out, lse)) shardings."""
  spec = tuple(getattr(q_sharding, "spec", ())) + (None,) * 4
  b, h = spec[0], spec[2]
  arg = NamedSharding(mesh, P(b, None, h, None))
  return (arg, arg, arg), (arg, NamedSharding(mesh, P(b, h, None)))


def _partition(mesh, arg_shapes, result_shape):
  args, outs = _shardings(mesh, arg_shapes[0].sharding)
  return mesh, _call_default, outs, args


def _infer(mesh, arg_shapes, result_shape):
  return _shardings(mesh, arg_shapes[0].sharding)[1]


_partitioned.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                           sharding_rule="b q h d, b k h d, b k h e -> b q h e, b h q",
                           need_replication_factors=("q", "d", "k", "e"))  # in order of first use
