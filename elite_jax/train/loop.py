"""The training loop: mesh, models, state, data, the jitted step, checkpoints, logs, preemption.

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
import jax.numpy as jnp
import numpy as np

from elite_jax import sharding, weights
from elite_jax.errors import InputError
from elite_jax.train import checkpoint, config as config_lib, step as step_lib
from elite_jax.train.models import Models, abstract_frozen, load_models

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
    self.tb = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / "tb"))

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


def _frozen_params(models: Models, raw: dict, cfg, mesh) -> tuple[dict, dict]:
  """Frozen trees cast to frozen_dtype and placed: replicated, or sharded by the rules table."""
  if cfg.shard_frozen:
    shardings = sharding.logical_shardings(abstract_frozen(models, cfg.data.resolution), mesh)
  else:
    shardings = sharding.replicated(raw, mesh)
  dtype = DTYPES[cfg.frozen_dtype]
  cast = lambda x: np.asarray(x).astype(dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else np.asarray(x)
  placed = jax.tree.map(lambda x, s: jax.device_put(cast(x), s), raw, shardings)
  return placed, shardings


def to_global(batch: dict, shardings: dict, grad_accum: int) -> dict:
  """Per-host (B_host, ...) numpy -> global (grad_accum, micro, ...) arrays on the mesh."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    local = v.reshape((grad_accum, v.shape[0] // grad_accum) + v.shape[1:])
    global_shape = (grad_accum, local.shape[1] * jax.process_count()) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(shardings[k], local, global_shape)
  return out


def train(cfg, workdir: str | os.PathLike) -> dict:
  """Run (or resume) training; returns the last logged metrics."""
  config_lib.validate(cfg)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if cfg.multihost:
    jax.distributed.initialize()
  mesh = sharding.make_mesh(**cfg.mesh)
  if (cfg.batch_size // cfg.grad_accum) % sharding.batch_shards(mesh):
    raise InputError(f"config.batch_size={cfg.batch_size} / grad_accum={cfg.grad_accum} is not divisible by the "
                     f"{sharding.batch_shards(mesh)} data shards of the mesh")
  if cfg.batch_size % jax.process_count():
    raise InputError(f"config.batch_size={cfg.batch_size} does not split over {jax.process_count()} hosts")

  models, raw_frozen, trainable_init = load_models(cfg)
  frozen, frozen_sh = _frozen_params(models, raw_frozen, cfg, mesh)
  del raw_frozen
  optimizer, schedule = step_lib.make_optimizer(cfg), step_lib.lr_schedule(cfg)
  state_sh = step_lib.state_shardings(models, optimizer, mesh)

  ckpt = checkpoint.Checkpointer(workdir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpoint)
  config_dict = json.loads(cfg.to_json())
  state = step_lib.init_state(models, optimizer, trainable_init["kv"], cfg.seed, state_sh)
  start = ckpt.latest_step()
  data_state = None
  if start is not None:
    abstract = checkpoint.abstract_like(state_sh, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                               state))
    del state
    state, data_state = ckpt.restore(start, abstract, config_dict)
    print(f"resumed from step {start} in {workdir}", file=sys.stderr)
  start = int(start or 0)

  loader = _make_loader(cfg, models, workdir, data_state)
  batch_sh = step_lib.batch_shardings(mesh, {k: np.zeros((1, 1) + s) for k, s in
                                             example_shapes(cfg.stage, cfg.data.resolution).items()})
  train_step = step_lib.make_train_step(models, cfg, optimizer, mesh, state_sh, frozen_sh, batch_sh)

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

  from tqdm.auto import tqdm
  last: dict[str, Any] = {}
  t0, n0 = time.perf_counter(), start
  with _Preemption() as preempt, tqdm(total=cfg.num_train_steps, initial=start, desc=f"stage {cfg.stage}",
                                      disable=jax.process_index() != 0) as bar:
    try:
      for step in range(start, cfg.num_train_steps):
        host_batch = next(loader)
        host_batch.pop("record", None)
        batch = to_global(host_batch, batch_sh, cfg.grad_accum)
        state, metrics = train_step(state, frozen, batch)
        done = step + 1
        pending.append((done, metrics["loss"]))
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.num_train_steps:
          check_finite()
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed = time.perf_counter() - t0
          last = {"step": done, **m, "learning_rate": float(schedule(step)),
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
  _export(cfg, models, state, workdir)
  ckpt.close()
  return last


def _make_loader(cfg, models: Models, workdir: Path, data_state):
  """Build the TFDS records once (host 0 first, the others then reuse them), then a grain loader of this host."""
  from elite_jax import data
  if not cfg.data.manual_dir:
    raise InputError("config.data.manual_dir is required: the OpenImages download or your folder of photos")
  data_dir = cfg.data.data_dir or str(workdir / "tfds")
  if jax.process_index() == 0:
    builder = data.prepare(cfg.data.builder, cfg.data.manual_dir, data_dir, cfg.stage)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("elite_jax data prepared")
  if jax.process_index() != 0:
    builder = data.prepare(cfg.data.builder, cfg.data.manual_dir, data_dir, cfg.stage)
  it = data.make_loader(builder, tokenizer=models.tokenizer, batch_size=cfg.batch_size // jax.process_count(),
                        stage=cfg.stage, resolution=cfg.data.resolution, seed=cfg.seed,
                        placeholder=cfg.data.placeholder, placeholder_index=cfg.data.placeholder_index,
                        worker_count=cfg.data.workers)
  if data_state is not None:
    it.set_state(data_state)
  return it


def example_shapes(stage: int, resolution: int) -> dict[str, tuple[int, ...]]:
  """Per-sample shapes of the loader's batches (elite_jax.data's contract)."""
  shapes = {"pixel_values": (resolution, resolution, 3), "pixel_values_clip": (224, 224, 3), "input_ids": (77,),
            "index": ()}
  if stage == 2:
    shapes.update(pixel_values_obj=(224, 224, 3), token_mask=(256,), mask_values=(resolution // 8, resolution // 8, 1))
  return shapes


def _export(cfg, models: Models, state: step_lib.TrainState, workdir: Path) -> Path:
  """The finished mapper as WORKDIR/{global,local}_mapper.safetensors, loadable by infer.py."""
  params = jax.device_get(state.params)
  name = "global_mapper.safetensors" if cfg.stage == 1 else "local_mapper.safetensors"
  path = workdir / name
  if jax.process_index() == 0:
    weights.save_mapper(path, models.mapper, params, models.unet.config, local=cfg.stage == 2)
    print(f"exported {path}", file=sys.stderr)
  return path
