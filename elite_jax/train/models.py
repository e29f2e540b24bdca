"""The models a training run needs: frozen SD + CLIP (+ the stage-1 mapper in stage 2) and the trainable mapper.

Trainable parameters are ``{"mapper": MLPs, "kv": attn2 K/V copies}``: stage 1 trains the global mapper and the
``to_k``/``to_v`` copies that replace SD's (initialised as copies of SD's, spec 3.4); stage 2 trains the local mapper
and ``to_k_local``/``to_v_local`` (new copies of SD's to_k/to_v), with the stage-1 mapper frozen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from elite_jax import schedulers, weights
from elite_jax.errors import InputError
from elite_jax.models import layers
from elite_jax.models.clip import CLIPTextTransformer, CLIPVisionTransformer
from elite_jax.models.mappers import GlobalMapper, LocalMapper, MapperConfig
from elite_jax.models.unet import UNet
from elite_jax.models.vae import AutoencoderKL

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Models:
  """Modules (stateless) and configs; parameters travel separately as pytrees."""
  stage: int
  unet: UNet
  vae: AutoencoderKL
  text_encoder: CLIPTextTransformer
  image_encoder: CLIPVisionTransformer
  mapper: MapperConfig  # the trained mapper's config
  global_mapper: MapperConfig | None  # stage 2: the frozen stage-1 mapper's config
  schedule: schedulers.NoiseSchedule
  tokenizer: Any

  @property
  def mapper_module(self) -> nn.Module:
    return (GlobalMapper if self.stage == 1 else LocalMapper)(self.mapper, self.unet.dtype)


def _kv_from_sd(unet_params: Params, paths: list[tuple[str, ...]], local: bool) -> Params:
  """Copies of SD's attn2 to_k/to_v kernels (renamed *_local for stage 2)."""
  flat = {}
  for path in paths:
    node = unet_params
    for p in path:
      node = node[p]
    for proj in ("to_k", "to_v"):
      flat[path + (proj + ("_local" if local else ""), "kernel")] = np.array(node[proj]["kernel"])
  return traverse_util.unflatten_dict(flat)


def mapper_config(cfg, image_dim: int, text_dim: int) -> MapperConfig:
  return MapperConfig(input_dim=image_dim, hidden_dim=int(cfg.mapper.hidden_dim), output_dim=text_dim,
                      depth=int(cfg.mapper.depth), tapped_layers=tuple(int(x) for x in cfg.mapper.tapped_layers))


def load_models(cfg) -> tuple[Models, Params, Params]:
  """(models, frozen params as numpy trees, initial trainable {"kv": ...} as numpy; the MLPs are initialised later)."""
  compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[cfg.compute_dtype]
  if cfg.pretrained == "random-tiny":
    from elite_jax.presets import SD14_SCHEDULER
    from elite_jax.random_preset import random_components
    c = random_components(seed=cfg.seed)  # RANDOM WEIGHTS: for first runs and tests without any download
    unet = UNet(c["unet"].config, dtype=compute, attention_impl=cfg.attention_impl, remat=cfg.remat)
    vae = AutoencoderKL(c["vae"].config, dtype=compute)
    text = CLIPTextTransformer(c["text_encoder"].config, dtype=compute)
    image = CLIPVisionTransformer(c["image_encoder"].config, dtype=compute)
    raw = jax.tree.map(np.asarray, c["params"])
    tokenizer, sched_cfg = c["tokenizer"], schedulers.NoiseSchedule.from_config(SD14_SCHEDULER)
  else:
    sd = weights.resolve(cfg.pretrained, subfolders=weights.SD_COMPONENTS)
    unet, unet_p = weights.load_unet(sd / "unet", compute, attention_impl=cfg.attention_impl, remat=cfg.remat)
    vae, vae_p = weights.load_vae(sd / "vae", compute)
    text, text_p = weights.load_text_encoder(sd / "text_encoder", compute)
    image, image_p = weights.load_image_encoder(weights.resolve(cfg.image_encoder), compute)
    raw = {"unet": unet_p, "vae": vae_p, "text_encoder": text_p, "image_encoder": image_p}
    tokenizer = weights.load_tokenizer(sd / "tokenizer")
    sched_cfg = schedulers.NoiseSchedule.from_config(weights.read_json(sd / "scheduler" / "scheduler_config.json"))

  text_dim, image_dim = text.config.hidden_size, image.config.hidden_size
  mcfg = mapper_config(cfg, image_dim, text_dim)
  if max(mcfg.tapped_layers) > image.config.num_hidden_layers:
    raise InputError(f"config.mapper.tapped_layers {mcfg.tapped_layers} reach past the image encoder's "
                     f"{image.config.num_hidden_layers} layers")
  paths = unet.config.cross_attention_paths()
  frozen = dict(raw)
  global_cfg = None
  if cfg.stage == 2:
    if not cfg.global_mapper:
      raise InputError("stage 2 needs the stage-1 mapper: --config.global_mapper=PATH")
    global_cfg, gw = weights.load_mapper(cfg.global_mapper, unet.config, local=False)
    if global_cfg.input_dim != image_dim or global_cfg.output_dim != text_dim:
      raise InputError(f"config.global_mapper {cfg.global_mapper} does not match the image/text encoders")
    frozen["global_mapper"] = gw
  trainable = {"kv": _kv_from_sd(raw["unet"], paths, local=cfg.stage == 2)}
  models = Models(cfg.stage, unet, vae, text, image, mcfg, global_cfg, sched_cfg, tokenizer)
  return models, frozen, trainable


# ---------------------------------------------------------------------------------------------------------------
# Abstract trees with logical axis names, for shardings and initialisation
# ---------------------------------------------------------------------------------------------------------------

def abstract_frozen(models: Models, resolution: int) -> Params:
  """The frozen parameter tree as boxed ShapeDtypeStructs (logical axis names included)."""
  u, v = models.unet, models.vae
  lat = resolution // 2 ** (len(v.config.block_out_channels) - 1)
  s = jax.ShapeDtypeStruct
  tree = {
      "unet": jax.eval_shape(lambda *a: u.init(jax.random.key(0), *a), s((1, lat, lat, u.config.in_channels),
                             jnp.float32), s((1,), jnp.float32), s((1, 77, u.config.cross_attention_dim),
                                                                   jnp.float32))["params"],
      "vae": jax.eval_shape(lambda x: v.init(jax.random.key(0), x), s((1, resolution, resolution, 3),
                                                                      jnp.float32))["params"],
      "text_encoder": jax.eval_shape(lambda x: models.text_encoder.init(jax.random.key(0), x),
                                     s((1, 77), jnp.int32))["params"],
      "image_encoder": jax.eval_shape(lambda x: models.image_encoder.init(jax.random.key(0), x),
                                      s((1, 224, 224, 3), jnp.float32))["params"],
  }
  if models.stage == 2:
    gm = models.global_mapper
    feats = [s((1, 2, gm.input_dim), jnp.float32)] * gm.num_words
    tree["global_mapper"] = {"mapper": jax.eval_shape(lambda f: GlobalMapper(gm).init(jax.random.key(0), f),
                                                      feats)["params"],
                             "kv": abstract_kv(models, local=False)}
  return tree


def abstract_kv(models: Models, local: bool) -> Params:
  shapes = weights.kv_shapes(models.unet.config, local)
  return jax.tree.map(lambda x: nn.LogicallyPartitioned(x, (layers.EMBED, layers.HEADS)), shapes)


def init_mapper(models: Models, rng: jax.Array) -> Params:
  """Fresh mapper MLPs (PyTorch's nn.Linear init, as the official code trains from)."""
  m = models.mapper
  feats = [jnp.zeros((1, 2, m.input_dim))] * m.num_words
  return models.mapper_module.clone(dtype=jnp.float32).init(rng, feats)["params"]


def abstract_trainable(models: Models) -> Params:
  return {"mapper": jax.eval_shape(lambda k: init_mapper(models, k), jax.random.key(0)),
          "kv": abstract_kv(models, local=models.stage == 2)}
