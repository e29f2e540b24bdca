"""Tiny models with random weights, built in memory: a Stable Diffusion bundle and ELITE mappers.

RANDOM WEIGHTS: the images they make are noise. They exercise every part of the real code (tokeniser, text
injection, image encoder, both mappers, the ELITE UNet, the sampling loop, the VAE) in seconds, with no download:
for ``--random-weights`` install checks, the tiny training configs, tests and benchmarks. ``size="sd14"`` gives the
real shapes (SD v1-4, CLIP ViT-L/14, ELITE's mappers, from ``elite_jax.models.presets``) with random weights.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from transformers import CLIPTokenizer

from elite_jax import schedulers
from elite_jax.concept import MapperBundle, kv_shapes
from elite_jax.models import presets
from elite_jax.models.clip import (CLIPTextConfig, CLIPTextTransformer, CLIPVisionConfig, CLIPVisionTransformer,
                                   text_config_from_transformers, vision_config_from_transformers)
from elite_jax.models.mappers import GlobalMapper, LocalMapper, MapperConfig
from elite_jax.models.unet import UNet, UNetConfig
from elite_jax.models.vae import AutoencoderKL, VAEConfig
from elite_jax.stable_diffusion import StableDiffusion
from elite_jax.types import Params

SIZES = ("tiny", "sd14")


# Words that become one BPE token each (as in the real CLIP vocabulary); other words split into characters.
WORDS = ("a", "photo", "of", "s", "the", "on", "beach", "dog", "cat", "in", "snow", "jungle", "red", "with", "far",
         "away", "very", "small", "zoomed", "close", "up", "rendering", "cropped", "clean", "dark", "bright", "cool",
         "good", "nice", "weird", "large", "one", "and", "my", "it", "there", "is", "at", "teapot", "backpack", "top",
         "wooden", "floor", "city", "background", "blue", "house", "green", "grass", "pink", "fabric", "shiny", "wet",
         "purple", "cube", "shaped", "mountain", "street", "sneaker", "toy", "bowl", "vase", "hat", "rug")


def _bytes_to_unicode() -> dict[int, str]:
  # CLIP's byte-level alphabet (printable bytes map to themselves, the rest to code points from 256 on).
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def write_tokenizer(folder: Path, words=WORDS) -> int:
  """A working CLIPTokenizer folder with a tiny vocabulary; returns its size (special tokens last, as in CLIP)."""
  folder.mkdir(parents=True, exist_ok=True)
  chars = list(_bytes_to_unicode().values())
  vocab: list[str] = chars + [c + "</w>" for c in chars]
  merges: list[str] = []
  for word in words:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
      merged, pair = symbols[0] + symbols[1], f"{symbols[0]} {symbols[1]}"
      if pair not in merges:
        merges.append(pair)
        vocab.append(merged)
      symbols = [merged] + symbols[2:]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  ids: dict[str, int] = {}
  for token in vocab:
    ids.setdefault(token, len(ids))
  (folder / "vocab.json").write_text(json.dumps(ids))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "model_max_length": 77, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
      "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))
  return len(ids)


def random_params(shapes: Params, rng: np.random.Generator) -> Params:
  """Plausible random weights for a tree of shapes, without running any init: kernels ~ N(0, 1/fan_in), norm
  scales 1, biases 0, embeddings ~ N(0, 0.02). Instant, where a jitted init of 24 layers takes a minute on a CPU."""
  def leaf(path, x):
    name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
    if name == "scale":
      return np.ones(x.shape, np.float32)
    if name == "bias":
      return np.zeros(x.shape, np.float32)
    if name == "lambda1":  # DINOv2's layer scale
      return np.ones(x.shape, np.float32)
    if name in ("embedding", "class_embedding", "cls_token", "position_embeddings", "register_tokens"):
      return (0.02 * rng.standard_normal(x.shape)).astype(np.float32)
    fan_in = int(np.prod(x.shape[:-1])) or 1
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(shapes))


def tokenizer() -> CLIPTokenizer:
  """A CLIPTokenizer of the tiny vocabulary, written to a temporary folder."""
  folder = Path(tempfile.mkdtemp(prefix="elite_jax_tiny_tokenizer_"))
  write_tokenizer(folder)
  return CLIPTokenizer.from_pretrained(str(folder))


def _configs(size: str, vocab: int):
  if size == "sd14":  # the real shapes: SD v1-4, CLIP ViT-L/14, ELITE's mappers (the tokenizer stays the tiny one)
    return (UNetConfig.from_diffusers(presets.SD14_UNET), VAEConfig.from_diffusers(presets.SD14_VAE),
            dataclasses.replace(text_config_from_transformers(presets.CLIP_L14_TEXT), eos_token_id=vocab - 1),
            vision_config_from_transformers(presets.CLIP_L14_VISION), MapperConfig())
  if size == "tiny":
    unet = UNetConfig(block_out_channels=(32, 32, 64), layers_per_block=1, heads=(4, 4, 4),
                      transformer_layers_per_block=(1, 1, 1), cross_attention_dim=32, norm_num_groups=8,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
    text = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, eos_token_id=vocab - 1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=24, num_attention_heads=4)
    return unet, vae, text, vision, MapperConfig(input_dim=32, hidden_dim=32, output_dim=32)
  raise ValueError(f"size must be one of {SIZES}, got {size!r}")


def stable_diffusion_and_mappers(seed: int = 0, size: str = "tiny",
                                 ) -> tuple[StableDiffusion, MapperBundle, MapperBundle]:
  """RANDOM models: a Stable Diffusion bundle (float32 numpy parameters) and a global and a local mapper for it.

  One generator seeded with ``seed`` draws, in order, the UNet, VAE, text and image encoder parameters, then each
  mapper's MLPs and K/V; the same seed always gives the same models.
  """
  tok = tokenizer()
  unet_cfg, vae_cfg, text_cfg, vis_cfg, map_cfg = _configs(size, len(tok.get_vocab()))
  rng = np.random.default_rng(seed)
  draw = lambda shapes: random_params(shapes, rng)
  unet, vae = UNet(unet_cfg), AutoencoderKL(vae_cfg)
  text_enc, image_enc = CLIPTextTransformer(text_cfg), CLIPVisionTransformer(vis_cfg)
  params = {"unet": draw(unet.param_shapes()), "vae": draw(vae.param_shapes()),
            "text_encoder": draw(text_enc.param_shapes()), "image_encoder": draw(image_enc.param_shapes())}
  sd = StableDiffusion(unet=unet, vae=vae, text_encoder=text_enc, image_encoder=image_enc, tokenizer=tok,
                       schedule=schedulers.NoiseSchedule.from_config(presets.SD14_SCHEDULER), params=params)
  mappers = []
  for kind, module in (("global", GlobalMapper(map_cfg)), ("local", LocalMapper(map_cfg))):
    mlp = draw(module.param_shapes())
    mappers.append(MapperBundle(kv=draw(kv_shapes(unet_cfg, kind)), mlp=mlp, config=map_cfg, kind=kind))
  return sd, mappers[0], mappers[1]


ENCODER_FAMILIES = ("clip", "dinov2", "siglip")


def image_encoder(family: str, seed: int = 0, num_layers: int | None = None, with_params: bool = True):
  """RANDOM tiny image encoders of each family at 224 px (module, numpy params, its processor config): CLIP as the
  tiny bundle's (24 layers, 16x16 patches), DINOv2 with 2 registers (12 layers, 8x8), SigLIP (12 layers, 7x7).
  ``with_params=False``: the module alone."""
  from elite_jax import image_processors  # noqa: PLC0415
  from elite_jax.models import encoders  # noqa: PLC0415
  if family == "clip":
    module = CLIPVisionTransformer(CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=num_layers or 24, num_attention_heads=4))
  elif family == "dinov2":
    module = encoders.Dinov2Model(encoders.Dinov2Config(image_size=224, patch_size=28, hidden_size=32,
                                                        num_hidden_layers=num_layers or 12, num_attention_heads=4,
                                                        mlp_ratio=2, num_register_tokens=2))
  elif family == "siglip":
    module = encoders.SiglipVisionModel(encoders.SiglipVisionConfig(image_size=224, patch_size=32, hidden_size=32,
                                                                    intermediate_size=64,
                                                                    num_hidden_layers=num_layers or 12,
                                                                    num_attention_heads=4))
  else:
    raise ValueError(f"tiny image encoder family must be one of {ENCODER_FAMILIES}, got {family!r}")
  if not with_params:
    return module
  params = random_params(module.param_shapes(), np.random.default_rng(seed))
  return module, params, image_processors.family_defaults(family, 224)


def shapes(boxed: Any) -> Any:
  """A tree of (boxed) ShapeDtypeStructs, unboxed, float32 (what ``random_params`` would fill)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.meta.unbox(boxed))


def stable_diffusion_shapes(size: str = "tiny") -> StableDiffusion:
  """The bundle of ``stable_diffusion(size=size)`` with ShapeDtypeStructs for parameters: nothing is drawn or
  allocated (ahead-of-time compilation at the real sizes, train/plan.py)."""
  tok = tokenizer()
  unet_cfg, vae_cfg, text_cfg, vis_cfg, _ = _configs(size, len(tok.get_vocab()))
  modules = {"unet": UNet(unet_cfg), "vae": AutoencoderKL(vae_cfg), "text_encoder": CLIPTextTransformer(text_cfg),
             "image_encoder": CLIPVisionTransformer(vis_cfg)}
  return StableDiffusion(**modules, tokenizer=tok, schedule=schedulers.NoiseSchedule.from_config(
      presets.SD14_SCHEDULER), params={k: shapes(m.param_shapes()) for k, m in modules.items()})


def stable_diffusion(seed: int = 0, size: str = "tiny") -> StableDiffusion:
  """RANDOM models: the Stable Diffusion bundle of ``stable_diffusion_and_mappers``."""
  return stable_diffusion_and_mappers(seed, size)[0]
