"""Training as several processes (hosts) for real: JAX's distributed runtime on 127.0.0.1, CPU devices per process,
gloo collectives, started by elite-launch. Two processes of four devices must compute what one process of eight
does, through a SIGTERM of every host, a kill -9 of one host, and resumes onto another host count."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

# Real training processes, several per test: the full tier (README, "Set up").
pytestmark = pytest.mark.full

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--config.multihost=True", "--config.batch_size=16", "--config.grad_accum=2", "--config.checkpoint_every=2",
          "--config.log_every=1", "--config.distributed.peer_timeout=5", "--config.distributed.heartbeat_timeout=30"]


def launch(workdir: Path, processes: int, steps: int, *extra: str, stage: int = 1, wait: bool = True):
  """elite-launch of train.py: ``processes`` x (8 / processes) CPU devices."""
  cmd = [sys.executable, "-m", "elite_jax.cli.launch", "--processes", str(processes), "--devices-per-process",
         str(8 // processes), "--", str(REPO / "train.py"), "--config", str(REPO / "configs" / f"tiny_stage{stage}.py"),
         "--workdir", str(workdir), f"--config.num_train_steps={steps}", *COMMON, *extra]
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  log = workdir.parent / f"{workdir.name}.{time.monotonic_ns()}.log"  # a file: a full pipe would block the hosts
  with log.open("w") as f:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
  proc.log = log
  if not wait:
    return proc
  proc.wait(timeout=900)
  assert proc.returncode == 0, output(proc)[-3000:]
  return output(proc)


def output(proc) -> str:
  return proc.log.read_text(errors="replace")


def metrics(workdir: Path) -> list[dict]:
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def same_metrics(got: list[dict], want: list[dict]) -> None:
  assert [r["step"] for r in got] == [r["step"] for r in want[:len(got)]]
  for a, b in zip(got, want):
    for k in ("loss", "loss_mle", "loss_reg", "grad_norm"):
      assert abs(a[k] - b[k]) <= 1e-6 * abs(b[k]), (a["step"], k, a[k], b[k])


def same_mapper(a: Path, b: Path, lr: float = 1e-4) -> None:
  """Equal up to float rounding. Adam moves every weight by about lr per step whatever its gradient's size, so a
  gradient element near 0 whose rounding differs (another all-reduce order) moves by up to lr: the tolerance is in
  units of the tiny configs' lr, as in tests/test_train_step.py's sharding test."""
  x, y = safetensors.numpy.load_file(str(a)), safetensors.numpy.load_file(str(b))
  assert x.keys() == y.keys()
  for k in x:
    np.testing.assert_allclose(x[k], y[k], rtol=0, atol=0.5 * lr, err_msg=k)


def wait_for(condition, proc, timeout=600):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if proc.poll() is not None:
      raise AssertionError(f"the run ended early: {output(proc)[-3000:]}")
    time.sleep(0.2)
  raise AssertionError("timed out")


def saved_steps(workdir: Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process of eight devices, 12 steps straight: the metrics and mapper every other run must give."""
  workdir = tmp_path_factory.mktemp("one_host")
  launch(workdir, 1, 12)
  return workdir


def test_two_hosts_compute_what_one_does_through_preemption_death_and_host_changes(reference, tmp_path):
  want = metrics(reference)
  workdir = tmp_path / "run"
  # 2 hosts; SIGTERM to every host (elite-launch passes it on) once 3 steps are logged: one checkpoint, clean exit
  proc = launch(workdir, 2, 200, wait=False)
  wait_for(lambda: (workdir / "metrics.jsonl").is_file() and len(metrics(workdir)) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  err = output(proc)
  assert proc.returncode == 0, err[-3000:]
  k = int(re.search(r"SIGTERM: saved step (\d+)", err).group(1))
  assert 3 <= k <= 8 and saved_steps(workdir)[-1] == k
  same_metrics(metrics(workdir), want)
  # resume the 2-host checkpoint on 1 host
  launch(workdir, 1, k + 3)
  same_metrics(metrics(workdir), want)
  # back on 2 hosts; kill -9 host 1 after its next checkpoint: host 0 stops within a bounded time, with one line
  proc = launch(workdir, 2, 200, wait=False)
  wait_for(lambda: saved_steps(workdir)[-1] > k + 3, proc)
  pids = re.search(r"process 0 is pid (\d+), process 1 is pid (\d+)", output(proc)).groups()
  os.kill(int(pids[1]), signal.SIGKILL)
  t0 = time.time()
  proc.wait(timeout=120)
  assert time.time() - t0 < 60
  err = output(proc)
  assert proc.returncode != 0
  assert "elite-launch: process 1 ended with signal 9" in err
  assert re.search(r"error: process 0 stops: process 1 has shown no sign of life for 5 s", err), err[-2000:]
  assert "Traceback" not in err
  # rerun every host: resumes from the last complete checkpoint, ends as the straight run
  launch(workdir, 2, 12)
  same_metrics(metrics(workdir), want)
  assert len(metrics(workdir)) == 12
  same_mapper(workdir / "global_mapper.safetensors", reference / "global_mapper.safetensors")


def test_stage2_on_two_hosts(reference, tmp_path):
  mapper = f"--config.global_mapper={reference / 'global_mapper.safetensors'}"
  one, two = tmp_path / "one", tmp_path / "two"
  launch(one, 1, 3, mapper, "--config.grad_accum=1", stage=2)  # w0 groups of 2 per device: 16 / 8 devices
  launch(two, 2, 3, mapper, "--config.grad_accum=1", stage=2)
  same_metrics(metrics(two), metrics(one))
  assert metrics(two)[-1]["loss_reg"] > 0
  same_mapper(two / "local_mapper.safetensors", one / "local_mapper.safetensors")
