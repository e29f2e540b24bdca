"""The train state, the optimizer and one jit-compiled, sharded train step with gradient accumulation.

Only the trainable tree (mapper MLPs + their K/V copies) has gradients and optimizer state; the frozen models enter
the step as an argument that is neither differentiated nor donated. Master weights stay in float32; the loss casts
them to the compute dtype, so bfloat16 compute still updates float32 parameters.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from elite_jax import sharding
from elite_jax.train import losses
from elite_jax.train.models import Models, abstract_trainable, init_mapper

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done
  params: Params  # trainable, float32
  opt_state: optax.OptState
  rng: jax.Array  # uint32[2] base key; step and micro-batch keys are folded in (exact resume)


def learning_rate(cfg) -> float:
  """The official --scale_lr (always on): base lr x effective batch (x grad accumulation x per-GPU batch x GPUs)."""
  return cfg.learning_rate * cfg.batch_size if cfg.scale_lr else cfg.learning_rate


def lr_schedule(cfg) -> optax.Schedule:
  """Constant (the official recipe), after an optional linear warmup."""
  lr = learning_rate(cfg)
  return optax.linear_schedule(0.0, lr, cfg.warmup_steps) if cfg.warmup_steps else optax.constant_schedule(lr)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """clip_grad_norm_(1) then AdamW, as the official loop (torch AdamW's decoupled decay equals optax.adamw's)."""
  return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.adamw(lr_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay))


def state_shardings(models: Models, optimizer, mesh: Mesh) -> TrainState:
  """Where each leaf of the train state lives: parameters by the rules table, optimizer moments like them."""
  abstract = abstract_trainable(models)
  params = sharding.logical_shardings(abstract, mesh)
  unboxed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), flax_unbox(abstract))
  opt_abstract = jax.eval_shape(optimizer.init, unboxed)
  # Optimizer leaves shaped like a parameter take its sharding; scalars (counts) are replicated.
  opt = optax.tree_map_params(optimizer, lambda _, s: s, opt_abstract, params,
                              transform_non_params=lambda _: NamedSharding(mesh, P()))
  rep = NamedSharding(mesh, P())
  return TrainState(step=rep, params=params, opt_state=opt, rng=rep)


def flax_unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def init_state(models: Models, optimizer, kv_init: Params, seed: int, shardings: TrainState) -> TrainState:
  """Fresh mapper MLPs (PyTorch init), K/V copies of SD's, optimizer state, placed on the mesh."""
  def init(kv):
    base = jax.random.PRNGKey(seed)
    mapper = flax_unbox(init_mapper(models, jax.random.fold_in(base, 1)))
    params = {"mapper": mapper, "kv": jax.tree.map(lambda x: x.astype(jnp.float32), kv)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=base)
  return jax.jit(init, out_shardings=shardings)(kv_init)


def make_train_step(models: Models, cfg, optimizer, mesh: Mesh, state_sh: TrainState, frozen_sh: Params,
                    batch_sh: dict) -> Callable:
  """jit(state, frozen, batch) -> (state, metrics); batch leaves are (grad_accum, micro_batch, ...)."""
  micro = cfg.batch_size // cfg.grad_accum
  shards = sharding.batch_shards(mesh)
  # The official w0-map max spans each GPU's micro-batch; "sample" fixes it.
  max_group = micro // shards if cfg.quirks.max_over_device_batch else 1
  loss_fn = functools.partial(losses.LOSSES[cfg.stage], models=models, reg_weight=cfg.reg_weight,
                              max_group=max_group, sum_channels=cfg.quirks.stage2_loss_sum_channels)

  def step(state: TrainState, frozen: Params, batch: dict) -> tuple[TrainState, dict]:
    step_key = jax.random.fold_in(state.rng, state.step)

    def accumulate(carry, xs):
      grads, i = carry
      mb_batch = xs
      (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, mb_batch,
                                                                 jax.random.fold_in(step_key, i))
      return (jax.tree.map(jnp.add, grads, g), i + 1), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, _), (loss, aux) = jax.lax.scan(accumulate, (zeros, jnp.int32(0)), batch)
    grads = jax.tree.map(lambda g: g / cfg.grad_accum, grads)  # the mean gradient over the effective batch
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": jnp.mean(loss), "grad_norm": optax.global_norm(grads)}
    metrics.update({k: jnp.mean(v) for k, v in aux.items()})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  rep = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, rep),
                 donate_argnums=(0,))


def batch_shardings(mesh: Mesh, example: dict) -> dict:
  """(grad_accum, micro_batch, ...) leaves: the micro-batch dimension split over data and fsdp."""
  return {k: NamedSharding(mesh, P(None, sharding.BATCH, *([None] * (v.ndim - 2)))) for k, v in example.items()}
