"""Several training processes (hosts) as one run: starting the distributed runtime, agreeing, noticing a dead host.

Every host runs the same command. ``initialize`` starts JAX's distributed runtime from the environment the local
launcher (``elite-launch``) or a scheduler gives (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``) or, without them, from JAX's own cluster detection (TPU pods, SLURM, Open MPI).

A host that dies leaves the others blocked in the next collective. JAX's runtime aborts them after its heartbeat
timeout, with a stack dump; ``Watchdog`` stops them earlier, with one line: every host bumps a counter in the
runtime's key-value store, and a host whose peer's counter has not moved for ``timeout`` seconds (or that cannot reach
the store, i.e. lost the coordinator) exits with ``EXIT_PEER_LOST``. A rerun of all hosts resumes from the last
complete checkpoint.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
from jax._src import distributed  # the runtime client: its key-value store (JAX exports no public handle to it)
from jax.experimental import multihost_utils

from elite_jax.errors import InputError

EXIT_PEER_LOST = 3  # a host stopped because another one died or vanished
_PREFIX = "elite_jax/alive/"
ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(*, heartbeat_timeout: int) -> None:
  """Join the run's other processes (see the module docstring); InputError for an incomplete environment."""
  given = {k: os.environ.get(k) for k in ENV}
  if any(given.values()) and not all(given.values()):
    missing = [k for k, v in given.items() if not v]
    raise InputError(f"multi-host training: {', '.join(missing)} not set (set all of {', '.join(ENV)}, or none of "
                     f"them to let JAX detect the cluster)")
  kw: dict[str, Any] = {}
  if all(given.values()):
    try:
      kw = dict(coordinator_address=given["JAX_COORDINATOR_ADDRESS"], num_processes=int(given["JAX_NUM_PROCESSES"]),
                process_id=int(given["JAX_PROCESS_ID"]))
    except ValueError:
      raise InputError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got {given['JAX_NUM_PROCESSES']!r}"
                       f" and {given['JAX_PROCESS_ID']!r}") from None
  try:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout, **kw)
  except ValueError as e:  # JAX found no cluster and was given none
    raise InputError(f"multi-host training: {e} (run under elite-launch, a scheduler JAX detects, or set "
                     f"{', '.join(ENV)})") from None


def check_single(cfg) -> None:
  """A run started by the launcher without ``config.multihost`` would be N unrelated runs in one workdir."""
  if not cfg.multihost and int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
    raise InputError("JAX_NUM_PROCESSES is set: this is one of several processes; add --config.multihost=True")


def any_host(flag: bool) -> bool:
  """True on every host when ``flag`` is True on any (a collective: every host must call it at the same point)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def total(count: int) -> int:
  """The sum of ``count`` over hosts (a collective)."""
  if jax.process_count() == 1:
    return count
  return int(np.sum(multihost_utils.process_allgather(np.int64(count))))


def fetch(tree: Any) -> Any:
  """A tree of (possibly sharded over hosts) arrays as numpy on every host (a collective on several hosts)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


class Watchdog:
  """Stops this process, with one line and ``EXIT_PEER_LOST``, when another host stops making progress signs."""

  def __init__(self, timeout: float, interval: float | None = None):
    self.timeout = float(timeout)
    self.interval = interval or max(0.5, self.timeout / 10)
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self) -> Watchdog:
    if jax.process_count() > 1:
      self._thread = threading.Thread(target=self._run, name="elite_jax-watchdog", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def _run(self) -> None:
    client = distributed.global_state.client
    me, n = jax.process_index(), jax.process_count()
    seen = {p: (None, time.monotonic()) for p in range(n) if p != me}  # last value, when it last changed
    beat = 0
    while not self._stop.wait(self.interval):
      beat += 1
      try:
        client.key_value_set(f"{_PREFIX}{me}", str(beat), allow_overwrite=True)
        values = dict(client.key_value_dir_get(_PREFIX))
      except Exception as e:  # noqa: BLE001 - the store is gone: the coordinator (process 0) died
        if self._stop.is_set():
          return
        self._exit(f"lost the coordinator (process 0): {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      for p, (value, since) in seen.items():
        now = values.get(f"{_PREFIX}{p}")
        if now != value:
          seen[p] = (now, time.monotonic())
        elif time.monotonic() - since > self.timeout:
          self._exit(f"process {p} has shown no sign of life for {self.timeout:.0f} s (it died or hangs)")

  def _exit(self, why: str) -> None:
    print(f"error: process {jax.process_index()} stops: {why}; rerun the same command on every host to resume from "
          f"the last complete checkpoint", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)  # the main thread may be blocked in a collective that will never complete
