"""``ELITE_JAX_NATIVE=auto``: whether the fused attention kernel beats the XLA form on this machine, timed once.

Why: the kernel's speed depends on the CPU (its vector width, registers, caches) and the build (``-march``); a
kernel that is slower than XLA's own form must never be the default (a 16-float build on an AVX2 CPU once ran 13x
slower). So the first process that needs it times the kernel against the XLA form the "cpu" attention falls back
to (``models.attention._cpu_blocked``) on a few of SD's shapes, a second or two, and the choice is written next to
the library (same key: source, jaxlib, compiler, flags, CPU) for every later process. A build is used only if it is
faster on every shape. Where the default build is the native 16-float (AVX-512) one, the AVX2 build (8 floats, its
own blocking) is timed beside it and the faster of the two is taken: on cores that execute 512-bit operations as two
256-bit halves (AMD Zen 4) it ran 1.1-1.3x faster, on Intel's AVX-512 cores 1.7x slower (BENCHMARKS.md). One log line (logger ``elite_jax.native``, INFO: ``elite-infer --verbose``) gives the
choice and its figures; ``python -m elite_jax.native`` prints them; ``ELITE_JAX_NATIVE=1`` or ``0`` overrides it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np

from elite_jax import native

log = logging.getLogger("elite_jax.native")

# (batch, queries, keys, heads, head width): SD v1's self-attention at 64 x 64 latents (half its queries, to keep
# the check short), at 32 x 32, the cross-attention over 77 text tokens there, and the 160-wide heads at 16 x 16.
SHAPES = ((1, 2048, 2048, 8, 40), (2, 1024, 1024, 8, 80), (2, 1024, 77, 8, 80), (2, 256, 256, 8, 160))
REPS = 3  # timed calls per form and shape at least, interleaved; the fastest counts (noise only ever adds time)
MIN_MS = 60.0  # ... and more, up to MAX_REPS, until each form has run this long on the shape (short shapes)
MAX_REPS = 20


@dataclasses.dataclass(frozen=True)
class Choice:
  """The self-check's outcome: which form the "cpu" attention uses, and the times (ms) it was decided on."""
  use_kernel: bool
  shapes: tuple[tuple[int, ...], ...]
  kernel_ms: tuple[float, ...]  # the chosen build's (the default build's where the XLA form was chosen)
  xla_ms: tuple[float, ...]
  source: str  # "measured now" or the cache file it was read from
  arch: str | None = None  # the compiler target of the build in ``kernel_ms`` (None: the default build)
  others: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (target, ms per shape) of the other builds timed

  def summary(self, kernel: native.Kernel | None = None) -> str:
    """One line; ``kernel``: the build in ``kernel_ms``, for its description."""
    def span(ms):
      ratios = [x / k for k, x in zip(ms, self.xla_ms)]
      return f"{min(ratios):.2f}-{max(ratios):.2f}x"
    build = f" ({kernel.describe()})" if kernel else ""
    verdict = "the fused kernel" if self.use_kernel else "the XLA form (the kernel was slower)"
    others = "".join(f"; the {arch} build {span(ms)}" for arch, ms in self.others)
    return (f"CPU attention: {verdict}{build}; kernel {span(self.kernel_ms)} the XLA form's speed on "
            f"{len(self.kernel_ms)} shapes{others}, {self.source}")


def decide(kernel_ms: Sequence[float], xla_ms: Sequence[float]) -> bool:
  """The kernel, only if it is at least as fast as the XLA form on every shape."""
  return all(k <= x for k, x in zip(kernel_ms, xla_ms, strict=True))


def pick(kernel_ms: Sequence[Sequence[float]], xla_ms: Sequence[float]) -> int | None:
  """The index of the build to use: of those at least as fast as the XLA form on every shape (``decide``), the one
  with the smallest geometric mean of its times over the XLA form's; None where no build is."""
  fast = [i for i, ms in enumerate(kernel_ms) if decide(ms, xla_ms)]
  score = lambda i: float(np.mean(np.log(np.asarray(kernel_ms[i]) / np.asarray(xla_ms))))  # noqa: E731
  return min(fast, key=score, default=None)


def candidates(kernel: native.Kernel) -> list[native.Kernel]:
  """The builds to time: ``kernel`` (the default build) and, where it is the native 16-float one on a CPU that runs
  x86-64-v3, the AVX2 build too (left out, with a log line, where it cannot be built)."""
  builds = [kernel]
  if kernel.arch == "native" and kernel.width == 16 and "x86-64-v3" in native.supported_archs():
    try:
      builds.append(native.load("x86-64-v3"))
    except RuntimeError as e:
      log.warning("elite_jax: the x86-64-v3 build of the CPU attention is unavailable (%s); timing the native one", e)
  return builds


def measure(kernels: Sequence[native.Kernel], shapes: Sequence[tuple[int, ...]] = SHAPES,
            reps: int = REPS) -> tuple[list[list[float]], list[float]]:
  """(ms per shape of each build in ``kernels``, ms per shape of the XLA form), timed interleaved. Runs in a thread
  of its own: a caller inside a ``jit`` trace (the first attention traced) would otherwise stage these calls into
  its own program."""
  out: dict = {}

  def run():
    try:
      out["times"] = _time(kernels, shapes, reps)
    except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
      out["error"] = e
  thread = threading.Thread(target=run, name="elite_jax-native-selfcheck")
  thread.start()
  thread.join()
  if "error" in out:
    raise out["error"]
  return out["times"]


def _time(kernels, shapes, reps):
  from elite_jax.models import attention  # noqa: PLC0415 - that module imports this package

  forms = [jax.jit(lambda q, k, v, kernel=kernel: kernel(q, k, v)[0]) for kernel in kernels]
  forms.append(jax.jit(attention._cpu_blocked))
  times = [[] for _ in forms]
  for b, lq, lk, h, d in shapes:
    rng = np.random.default_rng(0)
    q, k, v = (jax.device_put(rng.standard_normal((b, n, h, d)).astype(np.float32)) for n in (lq, lk, lk))
    best = [float("inf")] * len(forms)
    for form in forms:
      form(q, k, v).block_until_ready()  # compile
    spent, done = [0.0] * len(forms), 0
    while done < reps or (min(spent) < MIN_MS and done < MAX_REPS):
      for i, form in enumerate(forms):
        t0 = time.perf_counter()
        form(q, k, v).block_until_ready()
        ms = 1e3 * (time.perf_counter() - t0)
        best[i], spent[i] = min(best[i], ms), spent[i] + ms
      done += 1
    for i in range(len(forms)):
      times[i].append(round(best[i], 3))
  return times[:-1], times[-1]


def cache_path(kernel: native.Kernel) -> str:
  return kernel.path[:-len(".so")] + ".choice.json"


@functools.cache
def choice() -> Choice:
  """This process's choice for the default build (``native.kernel()``, which must be loaded), logged once."""
  kernel = native.kernel()
  got = choose(kernel)
  log.info(got.summary(chosen_build(got, kernel)))
  return got


def chosen_build(got: Choice, kernel: native.Kernel) -> native.Kernel:
  """The build ``got`` names, loaded; ``kernel``: the default build (its own where ``got`` names none, or where the
  named one can no longer be built: one warning, as a cached choice must not stop a run)."""
  if got.arch in (None, kernel.arch):
    return kernel
  try:
    return native.load(got.arch)
  except RuntimeError as e:
    log.warning("elite_jax: the chosen %s build of the CPU attention is unavailable (%s); using %s", got.arch, e,
                kernel.arch)
    return kernel


def choose(kernel: native.Kernel, timer: Callable = measure, builds: Sequence[native.Kernel] | None = None) -> Choice:
  """The cached choice for ``kernel``'s build (the default), else one measured with ``timer`` over ``builds``
  (default ``candidates(kernel)``) and cached. Processes that start together (a multi-host launch) take a file
  lock, so one measures and the others read its result."""
  path = cache_path(kernel)
  with _locked(path + ".lock"):
    cached = _read(path)
    if cached is not None:
      return cached
    builds = list(builds) if builds is not None else candidates(kernel)
    kernel_ms, xla_ms = timer(builds)
    best = pick(kernel_ms, xla_ms)
    i = 0 if best is None else best
    others = tuple((b.arch, tuple(ms)) for j, (b, ms) in enumerate(zip(builds, kernel_ms)) if j != i)
    got = Choice(best is not None, tuple(SHAPES), tuple(kernel_ms[i]), tuple(xla_ms), "measured now",
                 builds[i].arch, others)
    _write(path, got, builds[i])
    return got


def _read(path: str) -> Choice | None:
  try:
    with open(path) as f:
      data = json.load(f)
    shapes = tuple(tuple(s) for s in data["shapes"])
    if shapes != tuple(SHAPES) or "arch" not in data:
      return None  # measured on other shapes or builds (an older elite_jax): measure again
    others = tuple((str(arch), tuple(ms)) for arch, ms in data.get("others", []))
    return Choice(bool(data["use_kernel"]), shapes, tuple(data["kernel_ms"]), tuple(data["xla_ms"]),
                  f"cached in {path}", str(data["arch"]), others)
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _write(path: str, got: Choice, kernel: native.Kernel) -> None:
  data = {"use_kernel": got.use_kernel, "shapes": got.shapes, "kernel_ms": got.kernel_ms, "xla_ms": got.xla_ms,
          "arch": got.arch, "others": got.others, "kernel": kernel.describe(), "cpu": native.cpu_info()["model"],
          "date": time.strftime("%Y-%m-%d")}
  fd, tmp = tempfile.mkstemp(suffix=".json", dir=os.path.dirname(path))
  with os.fdopen(fd, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


class _locked:
  """An exclusive advisory lock on ``path`` (fcntl; where there is none, no lock: the write is atomic anyway)."""

  def __init__(self, path: str):
    self.path = path
    self.fd = None

  def __enter__(self):
    try:
      import fcntl  # noqa: PLC0415 - POSIX only
    except ImportError:
      return self
    self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(self.fd, fcntl.LOCK_EX)
    return self

  def __exit__(self, *exc):
    if self.fd is not None:
      os.close(self.fd)  # closing releases the lock
