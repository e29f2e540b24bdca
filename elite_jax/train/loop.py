"""The training loop: mesh, the training program, data, checkpoints, logs, preemption.

    train(config, workdir)

Rerunning on a workdir that holds checkpoints resumes from the latest one: state, optimizer, RNG and data position,
so N steps + resume to 2N equals 2N steps straight. SIGTERM saves and exits cleanly; a non-finite loss stops the run
before it can reach a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from elite_jax import data, sharding
from elite_jax.errors import InputError
from elite_jax.train import checkpoint, config as config_lib
from elite_jax.train.program import TrainProgram, TrainState, build
from elite_jax.weights.mapper_files import save_mapper


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or inf; the run stopped and the last checkpoint is the last good state."""


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no preemption saves
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class MetricsLog:
  """WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events under WORKDIR/tb."""

  def __init__(self, workdir: Path, resume_step: int):
    self.path = workdir / "metrics.jsonl"
    if self.path.exists():  # keep the history up to the restored step, so a resumed run's log reads straight
      kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
      self.path.write_text("".join(l + "\n" for l in kept))
    self.tb = SummaryWriter(str(workdir / "tb")) if jax.process_index() == 0 else None

  def write(self, record: dict) -> None:
    if jax.process_index() != 0:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, record["step"])
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def train(cfg, workdir: str | os.PathLike) -> dict:
  """Run (or resume) training; returns the last logged metrics."""
  config_lib.validate(cfg)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if cfg.multihost:
    jax.distributed.initialize()
  mesh = sharding.make_mesh(**cfg.mesh)
  if cfg.batch_size % jax.process_count():
    raise InputError(f"config.batch_size={cfg.batch_size} does not split over {jax.process_count()} hosts")
  program = build(cfg, mesh)

  ckpt = checkpoint.Checkpointer(workdir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpoint)
  config_dict = json.loads(cfg.to_json())
  start = ckpt.latest_step()
  data_state = None
  if start is None:
    state = program.init_state()
  else:
    state, data_state = ckpt.restore(start, program.abstract_state(), config_dict)
    print(f"resumed from step {start} in {workdir}", file=sys.stderr)
  start = int(start or 0)
  loader = _make_loader(cfg, program, workdir, data_state)

  log = MetricsLog(workdir, start)
  pending: list[tuple[int, jax.Array]] = []  # losses not yet checked for finiteness

  def check_finite() -> None:
    if pending:
      values = jax.device_get([l for _, l in pending])
      for (s, _), v in zip(pending, values):
        if not np.isfinite(v):
          raise NonFiniteLoss(f"loss is {float(v)} at step {s}; stopped before saving it (the last checkpoint in "
                              f"{workdir / 'checkpoints'} is the last good state)")
      pending.clear()

  last: dict[str, Any] = {}
  t0, n0 = time.perf_counter(), start
  with _Preemption() as preempt, tqdm(total=cfg.num_train_steps, initial=start, desc=f"stage {cfg.stage}",
                                      disable=jax.process_index() != 0) as bar:
    try:
      for step in range(start, cfg.num_train_steps):
        state, metrics = program.step(state, program.frozen, program.global_batch(next(loader)))
        done = step + 1
        pending.append((done, metrics["loss"]))
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.num_train_steps:
          check_finite()
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed = time.perf_counter() - t0
          last = {"step": done, **m, "learning_rate": float(program.schedule(step)),
                  "samples_per_sec": (done - n0) * cfg.batch_size / max(elapsed, 1e-9),
                  "skipped_records": int(loader.skipped)}
          log.write(last)
          bar.set_postfix(loss=f"{m['loss']:.4f}")
          t0, n0 = time.perf_counter(), done
        if done % cfg.checkpoint_every == 0 or done == cfg.num_train_steps or preempt.requested:
          check_finite()
          ckpt.save(done, state, loader.get_state(), config_dict, force=True)
        if preempt.requested:
          ckpt.wait()
          print(f"SIGTERM: saved step {done} in {workdir}; rerun the same command to resume", file=sys.stderr)
          return last
    finally:
      ckpt.wait()
      log.close()
  _export(program, state, workdir)
  ckpt.close()
  return last


def _make_loader(cfg, program: TrainProgram, workdir: Path, data_state):
  """Build the TFDS records once (host 0 first, the others then reuse them), then a grain loader of this host."""
  if not cfg.data.manual_dir:
    raise InputError("config.data.manual_dir is required: the OpenImages download or your folder of photos")
  data_dir = cfg.data.data_dir or str(workdir / "tfds")
  if jax.process_index() == 0:
    builder = data.prepare(cfg.data.builder, cfg.data.manual_dir, data_dir, cfg.stage)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("elite_jax data prepared")
  if jax.process_index() != 0:
    builder = data.prepare(cfg.data.builder, cfg.data.manual_dir, data_dir, cfg.stage)
  it = data.make_loader(builder, tokenizer=program.sd.tokenizer, batch_size=cfg.batch_size // jax.process_count(),
                        stage=cfg.stage, resolution=cfg.data.resolution, seed=cfg.seed,
                        placeholder=cfg.data.placeholder, placeholder_index=cfg.data.placeholder_index,
                        worker_count=cfg.data.workers)
  if data_state is not None:
    it.set_state(data_state)
  return it


def _export(program: TrainProgram, state: TrainState, workdir: Path) -> Path:
  """The finished mapper as WORKDIR/{global,local}_mapper.safetensors, loadable by infer.py."""
  params = jax.device_get(state.params)
  path = workdir / f"{program.kind}_mapper.safetensors"
  if jax.process_index() == 0:
    save_mapper(path, params, program.sd.unet.config)
    print(f"exported {path}", file=sys.stderr)
  return path
