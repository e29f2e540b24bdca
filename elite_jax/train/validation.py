"""A held-out validation loss during training: the training objective on fixed examples, noise and timesteps.

``config.validation.every`` steps, the current mapper's loss is computed on ``config.validation.batches`` batches
drawn once at the start (from ``config.validation.manual_dir``, or from the training data when it is empty: then
they are fixed, not held out) with the noise, VAE sample and timestep of each micro-batch drawn from one fixed key.
So every evaluation, of every run with the same data and seed, is the same measure: what a sweep compares. The
values are logged as ``val_loss`` and ``val_loss_mle`` (metrics.jsonl, TensorBoard).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from elite_jax import data
from elite_jax.errors import InputError
from elite_jax.train.program import TrainProgram, TrainState


@dataclasses.dataclass
class Validator:
  """Built once per run; ``__call__(step, state)`` returns the held-out metrics at validation steps, else {}."""
  every: int
  batches: list[dict[str, jax.Array]]  # global (grad_accum, micro, ...) arrays on the mesh
  fn: Callable  # jit(params, frozen, batch, key) -> {"val_loss", "val_loss_mle"}
  key: jax.Array
  frozen: Any

  def __call__(self, step: int, state: TrainState) -> dict[str, float]:
    if not self.every or step % self.every:
      return {}
    return self.evaluate(state)

  def evaluate(self, state: TrainState) -> dict[str, float]:
    sums: dict[str, float] = {}
    for i, batch in enumerate(self.batches):
      out = jax.device_get(self.fn(state.params, self.frozen, batch, jax.random.fold_in(self.key, i)))
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / len(self.batches) for k, v in sums.items()}


def make_validator(program: TrainProgram, workdir) -> Validator | None:
  """The run's validator (None when ``config.validation.every`` is 0): its fixed batches drawn now."""
  cfg = program.config
  v = cfg.validation
  if not v.every:
    return None
  if v.manual_dir:  # held-out data, built beside the training records
    manual_dir, data_dir = v.manual_dir, v.data_dir or str(workdir / "tfds_validation")
  else:
    manual_dir, data_dir = cfg.data.manual_dir, cfg.data.data_dir or str(workdir / "tfds")
  if not manual_dir:
    raise InputError("config.validation.every needs data: config.validation.manual_dir or config.data.manual_dir")
  builder = data.prepare(cfg.data.builder, manual_dir, data_dir, cfg.stage)
  loader = data.make_loader(builder, tokenizer=program.sd.tokenizer, batch_size=cfg.batch_size // jax.process_count(),
                            micro_batches=cfg.grad_accum, stage=cfg.stage, resolution=cfg.data.resolution,
                            seed=int(v.seed), placeholder=cfg.data.placeholder,
                            placeholder_index=cfg.data.placeholder_index, worker_count=0)
  batches = [program.global_batch(next(loader)) for _ in range(int(v.batches))]
  return Validator(every=int(v.every), batches=batches, fn=_eval_fn(program), key=jax.random.PRNGKey(int(v.seed)),
                   frozen=program.frozen)


def _eval_fn(program: TrainProgram) -> Callable:
  loss_fn = program.loss_fn
  precision = program.config.matmul_precision

  def evaluate(params, frozen, batch, key):
    with jax.default_matmul_precision(precision):
      def one(i_mb):
        i, mb = i_mb
        loss, aux = loss_fn(params, frozen, mb, jax.random.fold_in(key, i))
        return loss, aux["loss_mle"]
      n = jax.tree.leaves(batch)[0].shape[0]
      loss, mle = jax.lax.map(one, (jnp.arange(n), batch))
      return {"val_loss": jnp.mean(loss), "val_loss_mle": jnp.mean(mle)}

  rep = NamedSharding(program.mesh, P())
  return jax.jit(evaluate, in_shardings=(program.state_shardings.params, program.frozen_shardings,
                                         program.batch_shardings, rep), out_shardings=rep)
