"""Training survives what a crash or an impatient user leaves behind, each fault injected on purpose: Ctrl-C (once,
twice, during setup), a cut metrics line, a corrupt latest checkpoint (truncated or missing data, bad metadata), a
failed write during a save, a kill during the data build, and a randomized series of kills at seeded moments (SIGKILL,
SIGTERM, SIGINT; during steps, saves and exports) after which the run must end as a straight one."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from elite_jax.data import folder
from elite_jax.errors import InputError
from elite_jax.train import checkpoint, loop
from tests.test_train import PHOTOS, load_config, metrics

# Real training processes, several per test: the full tier (README, "Set up").
pytestmark = pytest.mark.full

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
RUN = ["--config.mesh.data=1", "--config.checkpoint_every=1", "--config.keep_checkpoints=2", "--config.export_every=3",
       "--config.log_every=1"]


def command(workdir: Path, steps: int = STEPS, *extra: str) -> list[str]:
  return [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_stage1.py"), "--workdir",
          str(workdir), f"--config.num_train_steps={steps}", *RUN, *extra]


def start(workdir: Path, *extra: str, steps: int = STEPS) -> subprocess.Popen:
  """train.py in a child whose SIGINT is not ignored (a background shell's children ignore it by default)."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  log = workdir.parent / f"{workdir.name}.{time.monotonic_ns()}.log"
  with log.open("w") as f:
    proc = subprocess.Popen(command(workdir, steps, *extra), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  proc.log = log
  return proc


def output(proc) -> str:
  return proc.log.read_text(errors="replace")


def finish(proc, timeout=600) -> str:
  proc.wait(timeout=timeout)
  return output(proc)


def logged(workdir: Path) -> int:
  path = workdir / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_until(condition, proc, timeout=600) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    assert proc.poll() is None, output(proc)[-3000:]
    time.sleep(0.05)
  raise AssertionError("timed out")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """STEPS steps without a fault: the metrics and mapper every faulty run must end with."""
  workdir = tmp_path_factory.mktemp("straight")
  proc = start(workdir)
  assert proc.wait(timeout=600) == 0, output(proc)[-3000:]
  return workdir


def same_run(workdir: Path, straight: Path) -> None:
  got, want = metrics(workdir), metrics(straight)
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))
  for a, b in zip(got, want):
    assert {k: v for k, v in a.items() if k != "samples_per_sec"} == {k: v for k, v in b.items()
                                                                        if k != "samples_per_sec"}
  x = safetensors.numpy.load_file(str(workdir / "global_mapper.safetensors"))
  y = safetensors.numpy.load_file(str(straight / "global_mapper.safetensors"))
  assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------------------------

def test_ctrl_c_saves_and_the_run_resumes(straight, tmp_path):
  workdir = tmp_path / "run"
  proc = start(workdir, "--config.checkpoint_every=1000", steps=200)
  wait_until(lambda: logged(workdir) >= 2, proc)
  proc.send_signal(signal.SIGINT)
  err = finish(proc)
  assert proc.returncode == 130, err[-2000:]
  saved = checkpoint.Checkpointer(workdir, every=1000, keep=3).steps()
  assert len(saved) == 1 and saved[0] <= 5
  assert err.strip().splitlines()[-1] == f"SIGINT: saved step {saved[0]} in {workdir}; rerun the same command to resume"
  assert "Traceback" not in err
  proc = start(workdir)
  assert proc.wait(timeout=600) == 0, output(proc)[-2000:]
  same_run(workdir, straight)


def test_a_second_ctrl_c_stops_at_once():
  """The first Ctrl-C of a training run asks for a save; a second one, while it runs, exits at once (130)."""
  script = ("import os, signal, time\nfrom elite_jax.train.loop import StopSignals\nwith StopSignals() as s:\n"
            "  s.training = True\n  os.kill(os.getpid(), signal.SIGINT)\n  time.sleep(0.5)\n"
            "  assert s.requested == signal.SIGINT\n  os.kill(os.getpid(), signal.SIGINT)\n  time.sleep(30)\n"
            "print('not reached')\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                        capture_output=True, text=True, timeout=120,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  assert proc.returncode == 130, proc.stderr
  assert proc.stderr.strip() == "SIGINT again: stopped at once; the checkpoints saved so far are intact"
  assert "not reached" not in proc.stdout


@pytest.mark.parametrize("phase", ["compile", "data"])
def test_ctrl_c_during_setup_stops_cleanly(tmp_path, monkeypatch, phase):
  """During compilation or data building there is nothing to save: Ctrl-C stops the run with one line."""
  from elite_jax.train import program as program_lib
  target = (program_lib.TrainProgram, "compile") if phase == "compile" else (loop.data, "prepare")
  real = getattr(*target)

  def interrupted(*a, **k):
    os.kill(os.getpid(), signal.SIGINT)  # as the user's Ctrl-C, delivered while this phase runs
    time.sleep(1)
    return real(*a, **k)
  monkeypatch.setattr(*target, interrupted)
  with pytest.raises(loop.Interrupted, match="SIGINT before training started: stopped, nothing to save"):
    loop.train(load_config("tiny_stage1", **{"mesh.data": 1}), tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# What a crash leaves: a cut log line, unreadable checkpoints, a failed save, a half-built data set
# ---------------------------------------------------------------------------------------------------------------

def _train(workdir: Path, steps: int, **over):
  return loop.train(load_config("tiny_stage1", num_train_steps=steps, checkpoint_every=2, **{"mesh.data": 1, **over}),
                    workdir)


def _same_as_straight(workdir: Path, straight: Path, steps: int) -> None:
  got, want = metrics(workdir), metrics(straight)[:steps]
  assert [r["step"] for r in got] == list(range(1, steps + 1))
  for a, b in zip(got, want):
    assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]


def test_a_cut_metrics_line_is_dropped(straight, tmp_path, capsys):
  workdir = tmp_path / "run"
  _train(workdir, 4)
  with (workdir / "metrics.jsonl").open("a") as f:
    f.write('{"step": 5, "loss": 1.2')  # a kill in the middle of a write
  _train(workdir, 6)
  assert "note: dropped 1 partial line(s) of" in capsys.readouterr().err
  _same_as_straight(workdir, straight, 6)


def _damage(step_dir: Path, how: str) -> None:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  if how == "truncate":  # bit rot, a copy cut short
    big = max(files, key=lambda p: p.stat().st_size)
    with big.open("r+b") as f:
      f.truncate(big.stat().st_size // 2)
  elif how == "delete":  # a lost data file
    max(files, key=lambda p: p.stat().st_size).unlink()
  else:  # unreadable metadata
    (step_dir / "state" / "_METADATA").write_text("{not json")


@pytest.mark.parametrize("how", ["truncate", "delete", "metadata"])
def test_an_unreadable_latest_checkpoint_is_moved_aside(straight, tmp_path, capsys, how):
  workdir = tmp_path / "run"
  _train(workdir, 4)  # checkpoints 2 and 4
  _damage(workdir / "checkpoints" / "4", how)
  _train(workdir, 6)
  err = capsys.readouterr().err
  assert f"warning: checkpoint 4 in {workdir / 'checkpoints'} cannot be read" in err
  assert "resumed from step 2" in err
  aside = list((workdir / "checkpoints.unreadable").iterdir())
  assert len(aside) == 1 and aside[0].name.startswith("4.")  # kept, not deleted
  _same_as_straight(workdir, straight, 6)


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
  workdir = tmp_path / "run"
  _train(workdir, 4)
  for step in (2, 4):
    _damage(workdir / "checkpoints" / str(step), "truncate")
  with pytest.raises(InputError, match=r"no checkpoint in .* can be read \(tried steps 4, 2; moved to"):
    _train(workdir, 6)


def test_a_failed_write_keeps_the_earlier_checkpoints(straight, tmp_path, monkeypatch):
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler
  workdir = tmp_path / "run"
  real = json_handler.JsonCheckpointHandler._save_fn

  async def disk_full(self, x, directory):
    if "/4" in str(directory) or str(directory).endswith("4"):
      raise OSError(28, "No space left on device")
    return await real(self, x, directory)
  monkeypatch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", disk_full)
  with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device.*intact \\(steps: 2\\)"):
    _train(workdir, 6)
  monkeypatch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", real)
  assert checkpoint.Checkpointer(workdir, every=2, keep=3).steps() == [2]
  _train(workdir, 6)
  _same_as_straight(workdir, straight, 6)


def test_a_kill_during_the_data_build_is_rebuilt(tmp_path):
  photos = tmp_path / "photos"
  photos.mkdir()
  for i in range(120):
    shutil.copy(PHOTOS / f"0{i % 5}.jpg", photos / f"{i:03d}.jpg")
  data_dir = tmp_path / "tfds"
  script = f"from elite_jax.data import folder; folder.build({str(photos)!r}, {str(data_dir)!r}, 1)"
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
  deadline = time.time() + 300
  while time.time() < deadline and not list(data_dir.rglob("*.array_record*")):
    assert proc.poll() is None, "the build ended before it could be killed"
    time.sleep(0.02)
  proc.kill()
  proc.wait()
  builder = folder.build(photos, data_dir, 1)  # the rerun: a complete build, not the half-written one
  clean = folder.build(photos, tmp_path / "clean", 1)
  source, want = builder.as_data_source(split="train"), clean.as_data_source(split="train")
  assert len(source) == len(want) == 120
  for i in (0, 59, 119):
    assert source[i]["id"] == want[i]["id"] and np.array_equal(source[i]["image"], want[i]["image"])


# ---------------------------------------------------------------------------------------------------------------
# Kills at random moments
# ---------------------------------------------------------------------------------------------------------------

def test_random_kills_end_as_a_straight_run(straight, tmp_path):
  """Seeded random kills (SIGKILL, SIGTERM, SIGINT) at random moments of the steps, their saves (every step) and
  exports (every 3 steps); after each, the same command again. The last run ends with the straight run's metrics and
  mapper, and one more rerun changes nothing."""
  rng = random.Random(20261201)
  signals = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]  # every kind, in a seeded order
  rng.shuffle(signals)
  workdir = tmp_path / "run"
  kills = []
  for sig in signals:
    done = logged(workdir)
    proc = start(workdir)
    deadline = time.time() + 600
    while time.time() < deadline and logged(workdir) <= done and proc.poll() is None:
      time.sleep(0.05)
    if proc.poll() is not None:  # it finished before a kill
      break
    time.sleep(rng.uniform(0.0, 2.0))
    proc.send_signal(sig)
    proc.wait(timeout=600)
    kills.append((sig.name, logged(workdir), proc.returncode))
    assert proc.returncode in {signal.SIGKILL: (-9, 0), signal.SIGTERM: (0,), signal.SIGINT: (130, 0)}[sig], \
        (kills, output(proc)[-2000:])
  print("kills (signal, logged steps, exit code):", kills)
  assert len(kills) == 3
  proc = start(workdir)
  assert proc.wait(timeout=600) == 0, output(proc)[-2000:]
  same_run(workdir, straight)
  proc = start(workdir)
  assert proc.wait(timeout=600) == 0
  same_run(workdir, straight)
