"""The training loop: hosts, mesh, the training program, data, checkpoints, logs, samples, signals.

    train(config, workdir)

Rerunning on a workdir that holds checkpoints resumes from the latest one that reads completely: state, optimizer,
RNG and data position, so N steps + resume to 2N equals 2N steps straight, on any number of hosts and any mesh.

Exit codes of ``elite-train`` (documented in the README): 0 done, or stopped by SIGTERM after saving; 1 a non-finite
loss (stopped before saving it); 2 bad input; 3 another host died (``hosts.Watchdog``); 4 a checkpoint could not be
written; 130 Ctrl-C. The first SIGTERM or SIGINT during training saves a checkpoint at the next step boundary, on
every host, then stops; a second SIGINT stops at once (what is saved stays intact); during setup (data building,
compilation) there is nothing to save and either stops the run at once.
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
from elite_jax.files import atomic_path
from elite_jax.train import checkpoint, config as config_lib, hosts
from elite_jax.train.program import TrainProgram, TrainState, build
from elite_jax.train.samples import SampleGrid
from elite_jax.train.validation import make_validator
from elite_jax.weights.mapper_files import save_mapper


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or inf; the run stopped and the last checkpoint is the last good state."""


EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C


class Interrupted(RuntimeError):
  """Ctrl-C (or a signal before training started): the run stopped; its message says what was saved."""


class StopSignals:
  """SIGTERM and SIGINT, as the module docstring says. ``training`` switches from stopping at once to a request the
  loop honours at the next step boundary."""

  def __init__(self):
    self.requested: int | None = None  # the signal that asked for a stop during training
    self.training = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handlers, no saves on signals
        pass
    return self

  def _handle(self, signum, frame):
    if self.training and self.requested is None:
      self.requested = signum
      return
    name = signal.Signals(signum).name
    if self.training:  # a second signal while the first one's save runs: stop now; the saved checkpoints are intact
      print(f"{name} again: stopped at once; the checkpoints saved so far are intact", file=sys.stderr, flush=True)
      os._exit(EXIT_INTERRUPTED)
    raise Interrupted(f"{name} before training started: stopped, nothing to save")

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


class MetricsLog:
  """WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events under WORKDIR/tb; process 0."""

  def __init__(self, workdir: Path, resume_step: int):
    self.path = workdir / "metrics.jsonl"
    self.tb = None
    if jax.process_index() != 0:
      return
    if self.path.exists():  # keep the history up to the restored step, so a resumed run's log reads straight
      kept, cut = [], 0
      for line in self.path.read_text(errors="replace").splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line a kill cut in the middle of its write
          cut += 1
          continue
        if record["step"] <= resume_step:
          kept.append(line)
      if cut:
        _note(f"note: dropped {cut} partial line(s) of {self.path} (a crash cut them)")
      with atomic_path(self.path) as tmp:
        tmp.write_text("".join(l + "\n" for l in kept))
    self.tb = SummaryWriter(str(workdir / "tb"))

  def write(self, record: dict) -> None:
    if self.tb is None:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, record["step"])
    self.tb.flush()

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    if self.tb is not None:
      self.tb.add_image(tag, image, step, dataformats="HWC")
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def train(cfg, workdir: str | os.PathLike) -> dict:
  """Run (or resume) training; returns the last logged metrics. Raises NonFiniteLoss, Interrupted (Ctrl-C),
  checkpoint.CheckpointWriteError and InputError, each with a one-line message (see the exit codes above)."""
  config_lib.validate(cfg)
  hosts.check_single(cfg)
  if cfg.multihost:  # first: JAX's runtime installs its own SIGTERM handler (a preemption notifier), which would
    hosts.initialize(heartbeat_timeout=int(cfg.distributed.heartbeat_timeout))  # take the place of ours
  with StopSignals() as signals:
    with hosts.Watchdog(cfg.distributed.peer_timeout):
      return _train(cfg, Path(workdir), signals)


def _train(cfg, workdir: Path, signals: StopSignals) -> dict:
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(**cfg.mesh)
  if cfg.batch_size % jax.process_count() or (cfg.batch_size // cfg.grad_accum) % jax.process_count():
    raise InputError(f"config.batch_size={cfg.batch_size} (/ grad_accum {cfg.grad_accum}) does not split over "
                     f"{jax.process_count()} hosts")
  program = build(cfg, mesh)
  step_fn, stats = _compiled_step(program)
  if jax.process_index() == 0:  # what a sweep tabulates: the step's cost and the trained parameter count
    counts = [int(np.prod(x.shape)) for x in jax.tree.leaves(program.abstract_state().params)]
    (workdir / "step_stats.json").write_text(json.dumps({**stats, "trainable_params": sum(counts)}))
  samples = SampleGrid(program, workdir) if cfg.samples.every else None

  ckpt = checkpoint.Checkpointer(workdir, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpoint)
  config_dict = json.loads(cfg.to_json())
  restored = ckpt.restore_latest(program.abstract_state(), config_dict)
  if restored is None:
    start, state, data_state = 0, program.init_state(), None
  else:
    start, state, data_state = restored
    _note(f"resumed from step {start} in {workdir}")
  loader = _make_loader(cfg, program, workdir, data_state)
  validate = make_validator(program, workdir)  # None unless config.validation.every

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

  def data_state_now() -> dict:  # the stream's position, with the skipped records of every host
    return {**loader.get_state(), "skipped": hosts.total(loader.skipped)}

  last: dict[str, Any] = {}
  t0, n0 = time.perf_counter(), start
  with tqdm(total=cfg.num_train_steps, initial=start, desc=f"stage {cfg.stage}",
            disable=jax.process_index() != 0) as bar:
    signals.training = True
    try:
      for step in range(start, cfg.num_train_steps):
        state, metrics = step_fn(state, program.frozen, program.global_batch(next(loader)))
        done = step + 1
        pending.append((done, metrics["loss"]))
        bar.update(1)
        stop = hosts.any_host(signals.requested is not None)  # every host saves the same step
        held_out = {}
        if validate is not None:
          t_val = time.perf_counter()
          held_out = validate(done, state)
          t0 += time.perf_counter() - t_val  # samples/s counts training steps only
        if done % cfg.log_every == 0 or done == cfg.num_train_steps or held_out:
          check_finite()
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed = time.perf_counter() - t0
          last = {"step": done, **m, "learning_rate": float(program.schedule(step)),
                  "samples_per_sec": (done - n0) * cfg.batch_size / max(elapsed, 1e-9),
                  "skipped_records": hosts.total(loader.skipped), **held_out}
          log.write(last)
          bar.set_postfix(loss=f"{m['loss']:.4f}")
          t0, n0 = time.perf_counter(), done
        if samples is not None and done % cfg.samples.every == 0:
          check_finite()
          grid = samples(done, state)
          if grid is not None:
            log.image("samples", grid, done)
        if cfg.export_every and done % cfg.export_every == 0 and done != cfg.num_train_steps:
          check_finite()
          _export(program, state, workdir / "mappers", f"_{done:07d}", official=cfg.export_official)
        if done % cfg.checkpoint_every == 0 or done == cfg.num_train_steps or stop:
          check_finite()
          ckpt.save(done, state, data_state_now(), config_dict, force=True)
        if stop:
          ckpt.wait()
          name = signal.Signals(signals.requested).name if signals.requested else "a signal to another host"
          message = f"{name}: saved step {done} in {workdir}; rerun the same command to resume"
          if signals.requested == signal.SIGINT:
            raise Interrupted(message)
          _note(message)
          return last
    finally:
      signals.training = False
      try:
        ckpt.wait()
      finally:
        log.close()
  _export(program, state, workdir, "", official=False)
  ckpt.close()
  return last


def _compiled_step(program: TrainProgram):
  """The step compiled ahead of time; its memory and FLOPs are printed, and a step that cannot fit stops the run."""
  compiled, stats = program.compile()
  need = stats.get("bytes_per_device")
  limit = program.config.memory_limit_gb * 2 ** 30 or _device_memory()
  if need is not None:
    _note(f"train step: {need / 2 ** 30:.2f} GiB per device (arguments {stats['argument_bytes'] / 2 ** 30:.2f}, "
          f"outputs {stats['output_bytes'] / 2 ** 30:.2f}, temporaries {stats['temp_bytes'] / 2 ** 30:.2f}, "
          f"donated {stats['alias_bytes'] / 2 ** 30:.2f}), {stats['flops'] / 1e9:.1f} GFLOP"
          + (f"; the device has {limit / 2 ** 30:.2f} GiB" if limit else ""))
    if limit and need > limit:
      raise InputError(f"the train step needs {need / 2 ** 30:.2f} GiB per device but {limit / 2 ** 30:.2f} GiB are "
                       f"available: lower config.batch_size or raise config.grad_accum, set config.remat=True, "
                       f"config.frozen_dtype='bfloat16' or config.shard_frozen=True, or use more devices")
  return compiled, stats


def _device_memory() -> int:
  """Bytes one device holds, where the backend says (GPUs, TPUs); 0 where it does not (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return int(stats.get("bytes_limit", 0))


def _note(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


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
                        micro_batches=cfg.grad_accum, stage=cfg.stage, resolution=cfg.data.resolution, seed=cfg.seed,
                        placeholder=cfg.data.placeholder, placeholder_index=cfg.data.placeholder_index,
                        worker_count=cfg.data.workers)
  if data_state is not None:
    it.set_state(data_state)
  return it


def _export(program: TrainProgram, state: TrainState, folder: Path, suffix: str, *, official: bool) -> None:
  """The mapper as FOLDER/{global,local}_mapper{suffix}.safetensors (+ .pt, official), loadable by infer."""
  params = hosts.fetch(state.params)  # a collective on several hosts: every host calls it
  if jax.process_index() != 0:
    return
  folder.mkdir(parents=True, exist_ok=True)
  for ext in (".safetensors", ".pt") if official else (".safetensors",):
    path = save_mapper(folder / f"{program.kind}_mapper{suffix}{ext}", params, program.sd.unet.config)
    _note(f"exported {path}")
