"""The training program, built in one place: models placed on the mesh, the optimizer, the train state, one step.

    program = build(config, mesh)
    state = program.init_state()                       # or checkpoint.restore(step, program.abstract_state(), ...)
    state, metrics = program.step(state, program.frozen, program.global_batch(host_batch))

Only the trainable mapper (a ``MapperBundle``: its MLPs and K/V copies) has gradients and optimizer state; the frozen
models enter the step as an argument that is neither differentiated nor donated. Master weights stay in float32; the
loss casts them to the compute dtype, so bfloat16 compute still updates float32 parameters. Stage 1 trains the global
mapper and the ``to_k``/``to_v`` copies that replace SD's (initialised as copies of SD's, spec 3.4); stage 2 the local
mapper and new ``to_k_local``/``to_v_local`` copies of SD's to_k/to_v, with the stage-1 mapper frozen.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from elite_jax import concept, data, sharding, tiny
from elite_jax.concept import MapperBundle
from elite_jax.errors import InputError
from elite_jax.models import encoders
from elite_jax.models.mappers import MapperConfig
from elite_jax.stable_diffusion import StableDiffusion
from elite_jax.train import losses
from elite_jax.types import Params, cast_floating
from elite_jax.weights.mapper_files import load_mapper

KIND = {1: "global", 2: "local"}  # the mapper each stage trains
TINY_ENCODER = "random-tiny-"  # config.image_encoder "random-tiny-{clip,dinov2,siglip}": tiny.image_encoder


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done
  params: MapperBundle  # trainable, float32
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


def load_models(cfg, abstract: bool = False) -> tuple[StableDiffusion, MapperConfig, MapperBundle | None]:
  """(the frozen models, numpy float32 parameters; the trained mapper's config; stage 2's frozen stage-1 mapper).

  ``abstract``: parameters as ShapeDtypeStructs and nothing read or downloaded (ahead-of-time plans, train/plan.py):
  the tiny shapes for ``pretrained='random-tiny'``, else SD v1-4's and CLIP ViT-L/14's (models/presets.py).
  """
  tiny_encoder = str(cfg.image_encoder).startswith(TINY_ENCODER)
  if tiny_encoder and cfg.pretrained != "random-tiny":
    raise InputError(f"config.image_encoder={cfg.image_encoder!r} (random weights) goes with "
                     f"config.pretrained='random-tiny'")
  if abstract:
    sd = tiny.stable_diffusion_shapes("tiny" if cfg.pretrained == "random-tiny" else "sd14")
  elif cfg.pretrained == "random-tiny":
    sd = tiny.stable_diffusion(seed=cfg.seed)  # RANDOM WEIGHTS: for first runs and tests without any download
  else:
    sd = StableDiffusion.load(cfg.pretrained, cfg.image_encoder)
  if tiny_encoder:  # RANDOM WEIGHTS: "random-tiny-dinov2" etc., tiny encoders of each family (sweeps, tests)
    family = cfg.image_encoder[len(TINY_ENCODER):]
    if abstract:
      module = tiny.image_encoder(family, with_params=False)
      params, processor = tiny.shapes(module.param_shapes()), sd.image_processor
    else:
      module, params, processor = tiny.image_encoder(family, seed=cfg.seed)
    sd = sd.replace(image_encoder=module, image_processor=processor,
                    params=dict(sd.params, image_encoder=params))
  if cfg.get("scan_image_encoder", False):
    module, params = encoders.with_scanned_layers(sd.image_encoder, sd.params["image_encoder"], True)
    sd = sd.replace(image_encoder=module, params=dict(sd.params, image_encoder=params))
  sd = sd.configure(dtype=cfg.compute_dtype, attention_impl=cfg.attention_impl, remat=cfg.remat)
  sd.check()
  vision = sd.image_encoder.config
  taps = tuple(int(x) for x in cfg.mapper.tapped_layers) or encoders.default_taps(vision.num_hidden_layers)
  mapper = MapperConfig(input_dim=vision.hidden_size, hidden_dim=int(cfg.mapper.hidden_dim), output_dim=sd.text_dim,
                        depth=int(cfg.mapper.depth), tapped_layers=taps,
                        encoder=encoders.EncoderRecord.of(sd.image_encoder))
  if max(mapper.tapped_layers) > vision.num_hidden_layers:
    raise InputError(f"config.mapper.tapped_layers {mapper.tapped_layers} reach past the image encoder's "
                     f"{vision.num_hidden_layers} layers")
  global_mapper = None
  if cfg.stage == 2 and abstract:  # stage 1's mapper of the same config, as shapes
    global_mapper = tiny.shapes(concept.mapper_shapes(mapper, "global", sd.unet.config))
  elif cfg.stage == 2:
    if not cfg.global_mapper:
      raise InputError("stage 2 needs the stage-1 mapper: --config.global_mapper=PATH")
    global_mapper = load_mapper(cfg.global_mapper, sd.unet.config, "global")
    concept.check_fits(global_mapper, sd.image_encoder, sd.text_dim)
  return sd, mapper, global_mapper


def load_warm_start(cfg, sd: StableDiffusion, mapper: MapperConfig) -> MapperBundle | None:
  """The trained mapper's starting point from ``config.init_{global,local}_mapper``, if given (float32 numpy)."""
  key = f"init_{KIND[cfg.stage]}_mapper"
  path = cfg[key]
  if not path:
    return None
  bundle = load_mapper(path, sd.unet.config, KIND[cfg.stage])
  got = dataclasses.replace(bundle.config, encoder=bundle.config.encoder_record)  # unrecorded: CLIP L/14's layout
  if got != mapper:
    diffs = [f"{f} {getattr(got, f)!r} (file) vs {getattr(mapper, f)!r} (config)"
             for f in ("input_dim", "hidden_dim", "output_dim", "depth", "tapped_layers", "encoder")
             if getattr(got, f) != getattr(mapper, f)]
    raise InputError(f"config.{key} {path} does not fit config.mapper: " + "; ".join(diffs))
  return bundle


@dataclasses.dataclass(frozen=True, eq=False)
class TrainProgram:
  """Everything one training run computes with, built by ``build``; the loop, the tests and the benchmark use it."""
  config: Any
  mesh: Mesh
  sd: StableDiffusion  # modules in the compute dtype; params are the placed frozen model trees
  mapper: MapperConfig  # of the trained mapper
  frozen: Params  # the step's frozen argument: sd.params, and stage 2's "global_mapper" bundle
  frozen_shardings: Params
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: TrainState
  batch_shardings: dict[str, NamedSharding]
  step: Callable  # jit(state, frozen, batch) -> (state, metrics); batch leaves are (grad_accum, micro_batch, ...)
  kv_init: Params  # numpy float32: the K/V copies' starting point (SD's attn2 K/V, or a warm start's)
  mlp_init: Params | None  # numpy float32 MLPs of a warm start; None: PyTorch's init
  loss_fn: Callable | None = None  # (trainable, frozen, micro_batch, key) -> (loss, aux): what the step differentiates

  @property
  def kind(self) -> str:
    return KIND[self.config.stage]

  def _init(self, kv: Params, mlp: Params | None) -> TrainState:
    base = jax.random.PRNGKey(self.config.seed)
    if mlp is None:
      mlp = concept.init_mlp(self.mapper, self.kind, jax.random.fold_in(base, 1))
    params = MapperBundle(kv=jax.tree.map(lambda x: x.astype(jnp.float32), kv),
                          mlp=jax.tree.map(lambda x: x.astype(jnp.float32), mlp), config=self.mapper, kind=self.kind)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params), rng=base)

  def init_state(self) -> TrainState:
    """The mapper's MLPs (PyTorch's init, or the warm start's), its K/V (copies of SD's, or the warm start's),
    optimizer state, placed on the mesh."""
    return jax.jit(self._init, out_shardings=self.state_shardings)(self.kv_init, self.mlp_init)

  def abstract_state(self) -> TrainState:
    """The train state as ShapeDtypeStructs with their shardings (a restore target; nothing is allocated)."""
    shapes = jax.eval_shape(self._init, self.kv_init, self.mlp_init)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        self.state_shardings)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step takes, as ShapeDtypeStructs with their shardings."""
    cfg = self.config
    spec = data.example_spec(cfg.stage, cfg.data.resolution)
    micro = cfg.batch_size // cfg.grad_accum
    return {k: jax.ShapeDtypeStruct((cfg.grad_accum, micro) + shape, dtype, sharding=self.batch_shardings[k])
            for k, (shape, dtype) in spec.items()}

  def compile(self, compiler_options: dict[str, Any] | None = None) -> tuple[Callable, dict[str, float]]:
    """The step compiled ahead of time (with XLA ``compiler_options``), and what it needs: bytes per device
    (arguments, outputs and temporaries, less what donation reuses) and FLOPs per step, from XLA's own analyses."""
    lowered = self.step.lower(self.abstract_state(), self.frozen, self.abstract_batch())
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    return compiled, compiled_stats(compiled)

  def global_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's (B_host, ...) numpy batch -> global (grad_accum, micro, ...) arrays on the mesh (other keys of
    the loader's batches, such as ``record``, are left out)."""
    accum = self.config.grad_accum
    out = {}
    for k, sh in self.batch_shardings.items():
      v = np.asarray(host_batch[k])
      local = v.reshape((accum, v.shape[0] // accum) + v.shape[1:])
      out[k] = jax.make_array_from_process_local_data(sh, local, (accum, local.shape[1] * jax.process_count())
                                                      + v.shape[1:])
    return out


def compiled_stats(compiled) -> dict[str, float]:
  """What a compiled program needs, from XLA's own analyses: bytes per device (arguments, outputs, temporaries,
  less what donation reuses) and FLOPs (0 where XLA gives none)."""
  mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  stats = {"flops": float((cost or {}).get("flops", 0.0))}
  if mem is not None:
    parts = {f: int(getattr(mem, f"{f}_size_in_bytes", 0)) for f in ("argument", "output", "temp", "alias")}
    stats.update({f"{k}_bytes": v for k, v in parts.items()})
    stats["bytes_per_device"] = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
  return stats


def build(cfg, mesh: Mesh, abstract: bool = False) -> TrainProgram:
  """The training program of ``cfg`` on ``mesh``: models loaded and placed, optimizer, shardings, the jitted step.

  ``abstract``: nothing loaded or placed; the frozen trees and the K/V starting point are ShapeDtypeStructs (with
  their shardings), so that ``compile()`` works on a mesh of devices this process does not have (a TPU topology,
  train/plan.py). The step is the same function either way.
  """
  micro = cfg.batch_size // cfg.grad_accum
  if micro % sharding.batch_shards(mesh):
    raise InputError(f"config.batch_size={cfg.batch_size} / grad_accum={cfg.grad_accum} is not divisible by the "
                     f"{sharding.batch_shards(mesh)} data shards of the mesh")
  sd, mapper, global_mapper = load_models(cfg, abstract)
  kind = KIND[cfg.stage]
  warm = None if abstract else load_warm_start(cfg, sd, mapper)
  if abstract:
    kv_init = tiny.shapes(concept.kv_shapes(sd.unet.config, kind))
  else:
    kv_init = warm.kv if warm is not None else concept.kv_from_unet(sd.params["unet"], sd.unet.config, kind)

  # Frozen trees, cast to frozen_dtype on the host and placed: replicated, or sharded by the rules table.
  host = dict(sd.params)
  if global_mapper is not None:
    host["global_mapper"] = global_mapper
  if cfg.shard_frozen:
    logical = sd.param_shapes()
    if global_mapper is not None:
      logical["global_mapper"] = concept.mapper_shapes(global_mapper.config, "global", sd.unet.config)
    frozen_sh = sharding.logical_shardings(logical, mesh)
  else:
    frozen_sh = sharding.replicated(host, mesh)
  if abstract:
    frozen = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, _frozen_dtype(x.dtype, cfg.frozen_dtype),
                                                             sharding=sh), host, frozen_sh)
  else:
    frozen = jax.tree.map(jax.device_put, cast_floating(host, cfg.frozen_dtype), frozen_sh)
  sd = sd.replace(params={k: frozen[k] for k in sd.params})

  optimizer = make_optimizer(cfg)
  state_sh = _state_shardings(concept.mapper_shapes(mapper, kind, sd.unet.config), optimizer, mesh)
  spec = data.example_spec(cfg.stage, cfg.data.resolution)
  batch_sh = {k: NamedSharding(mesh, P(None, sharding.BATCH, *([None] * len(shape)))) for k, (shape, _) in
              spec.items()}
  max_group = int(cfg.quirks.w0_max_group)
  per_device = micro // sharding.batch_shards(mesh)
  if cfg.stage == 2 and per_device % max_group:
    raise InputError(f"config.quirks.w0_max_group={max_group} does not divide the per-device micro-batch "
                     f"{per_device} (batch_size {cfg.batch_size} / grad_accum {cfg.grad_accum} / "
                     f"{sharding.batch_shards(mesh)} data shards)")
  loss_fn = functools.partial(losses.LOSSES[cfg.stage], sd=sd, reg_weight=cfg.reg_weight, max_group=max_group,
                              sum_channels=cfg.quirks.stage2_loss_sum_channels)
  step = _make_step(loss_fn, optimizer, cfg.grad_accum, mesh, state_sh, frozen_sh, batch_sh, cfg.matmul_precision)
  return TrainProgram(config=cfg, mesh=mesh, sd=sd, mapper=mapper, frozen=frozen, frozen_shardings=frozen_sh,
                      optimizer=optimizer, schedule=lr_schedule(cfg), state_shardings=state_sh,
                      batch_shardings=batch_sh, step=step, kv_init=kv_init,
                      mlp_init=None if warm is None else warm.mlp, loss_fn=loss_fn)


def _frozen_dtype(dtype: Any, frozen: str) -> Any:
  return jnp.dtype(frozen) if jnp.issubdtype(dtype, jnp.floating) else dtype


def _state_shardings(abstract: MapperBundle, optimizer, mesh: Mesh) -> TrainState:
  """Where each leaf of the train state lives: parameters by the rules table, optimizer moments like them."""
  params = sharding.logical_shardings(abstract, mesh)
  unboxed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), nn.meta.unbox(abstract))
  opt_abstract = jax.eval_shape(optimizer.init, unboxed)
  rep = NamedSharding(mesh, P())
  # Optimizer leaves shaped like a parameter take its sharding; scalars (counts) are replicated.
  opt = optax.tree_map_params(optimizer, lambda _, s: s, opt_abstract, params, transform_non_params=lambda _: rep)
  return TrainState(step=rep, params=params, opt_state=opt, rng=rep)


def _make_step(loss_fn, optimizer, grad_accum: int, mesh: Mesh, state_sh: TrainState, frozen_sh: Params,
               batch_sh: dict, precision: str) -> Callable:
  def step(state: TrainState, frozen: Params, batch: dict) -> tuple[TrainState, dict]:
    # Both apply while tracing: the precision to every matmul and conv of the step; the mesh to the kernels that
    # XLA cannot partition (the TPU's flash attention runs per device in a shard_map over it).
    with jax.default_matmul_precision(precision), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return _step(state, frozen, batch)

  def _step(state: TrainState, frozen: Params, batch: dict) -> tuple[TrainState, dict]:
    step_key = jax.random.fold_in(state.rng, state.step)

    def accumulate(carry, mb_batch):
      grads, i = carry
      (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, mb_batch,
                                                                 jax.random.fold_in(step_key, i))
      return (jax.tree.map(jnp.add, grads, g), i + 1), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, _), (loss, aux) = jax.lax.scan(accumulate, (zeros, jnp.int32(0)), batch)
    grads = jax.tree.map(lambda g: g / grad_accum, grads)  # the mean gradient over the effective batch
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": jnp.mean(loss), "grad_norm": optax.global_norm(grads)}
    metrics.update({k: jnp.mean(v) for k, v in aux.items()})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  rep = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, rep),
                 donate_argnums=(0,))
