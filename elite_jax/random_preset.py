"""A tiny Stable Diffusion + ELITE with random weights, built in memory: for checking an install offline.

RANDOM WEIGHTS: the images it makes are noise. It exercises every part of the real pipeline (tokeniser, text
injection, image encoder, both mappers, the ELITE UNet, scheduler loop, VAE decode) in seconds, with no download.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elite_jax import weights
from elite_jax.presets import SD14_SCHEDULER
from elite_jax.models.clip import CLIPTextConfig, CLIPTextTransformer, CLIPVisionConfig, CLIPVisionTransformer
from elite_jax.models.mappers import GlobalMapper, LocalMapper, MapperConfig
from elite_jax.models.unet import UNet, UNetConfig
from elite_jax.models.vae import AutoencoderKL, VAEConfig


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


def random_params(shapes, rng: np.random.Generator):
  """Plausible random weights for a tree of shapes, without running any init: kernels ~ N(0, 1/fan_in), norm
  scales 1, biases 0, embeddings ~ N(0, 0.02). Instant, where a jitted init of 24 layers takes a minute on a CPU."""
  def leaf(path, x):
    name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
    if name == "scale":
      return np.ones(x.shape, np.float32)
    if name == "bias":
      return np.zeros(x.shape, np.float32)
    if name in ("embedding", "class_embedding"):
      return (0.02 * rng.standard_normal(x.shape)).astype(np.float32)
    fan_in = int(np.prod(x.shape[:-1])) or 1
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(shapes))


def random_components(seed: int = 0, dtype=jnp.float32, size: str = "tiny") -> dict:
  """Random modules and parameters: unet, vae, text_encoder, image_encoder, tokenizer, params (the four models'
  trees, SD's own attn2 K/V untouched) and mapper bundles ``global_mapper`` / ``local_mapper``. ``size``: "tiny", or
  "sd14" for the real shapes (benchmarks; the tokenizer stays the tiny one)."""
  from elite_jax.pipeline import MapperBundle
  folder = Path(tempfile.mkdtemp(prefix="elite_jax_random_"))
  vocab = write_tokenizer(folder / "tokenizer")
  from transformers import CLIPTokenizer
  tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
  if size == "sd14":  # the real shapes (benchmarks): SD v1-4, CLIP ViT-L/14, ELITE's mappers
    from elite_jax import presets
    from elite_jax.models.clip import text_config_from_transformers, vision_config_from_transformers
    unet_cfg, vae_cfg = UNetConfig.from_diffusers(presets.SD14_UNET), VAEConfig.from_diffusers(presets.SD14_VAE)
    text_cfg = dataclasses.replace(text_config_from_transformers(presets.CLIP_L14_TEXT), eos_token_id=vocab - 1)
    vis_cfg = vision_config_from_transformers(presets.CLIP_L14_VISION)
    map_cfg = MapperConfig()
  elif size == "tiny":
    unet_cfg = UNetConfig(block_out_channels=(32, 32, 64), layers_per_block=1, heads=(4, 4, 4),
                          transformer_layers_per_block=(1, 1, 1), cross_attention_dim=32, norm_num_groups=8,
                          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae_cfg = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
    text_cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, eos_token_id=vocab - 1)
    vis_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=24, num_attention_heads=4)
    map_cfg = MapperConfig(input_dim=32, hidden_dim=32, output_dim=32)
  else:
    raise ValueError(f"size must be 'tiny' or 'sd14', got {size!r}")
  width, vis_width = text_cfg.hidden_size, vis_cfg.hidden_size
  rng = np.random.default_rng(seed)
  init = lambda m, *a: random_params(jax.eval_shape(lambda *x: m.init(jax.random.key(0), *x), *a)["params"], rng)
  s = jax.ShapeDtypeStruct
  unet, vae = UNet(unet_cfg, dtype=dtype), AutoencoderKL(vae_cfg, dtype=dtype)
  text_enc, image_enc = CLIPTextTransformer(text_cfg, dtype=dtype), CLIPVisionTransformer(vis_cfg, dtype=dtype)
  feats = [s((1, 257, vis_width), jnp.float32)] * map_cfg.num_words
  params = {"unet": init(unet, s((1, 8, 8, 4), jnp.float32), s((1,), jnp.float32), s((1, 77, width), jnp.float32)),
            "vae": init(vae, s((1, 64, 64, 3), jnp.float32)),
            "text_encoder": init(text_enc, s((1, 77), jnp.int32)),
            "image_encoder": init(image_enc, s((1, 224, 224, 3), jnp.float32))}
  g = MapperBundle(map_cfg, init(GlobalMapper(map_cfg), feats),
                   random_params(weights.kv_shapes(unet_cfg, local=False), rng))
  l = MapperBundle(map_cfg, init(LocalMapper(map_cfg), feats),
                   random_params(weights.kv_shapes(unet_cfg, local=True), rng))
  cast = lambda t: weights.to_dtype(t, dtype)
  g = MapperBundle(g.config, cast(g.params), cast(g.kv))
  l = MapperBundle(l.config, cast(l.params), cast(l.kv))
  return dict(unet=unet, vae=vae, text_encoder=text_enc, image_encoder=image_enc, tokenizer=tokenizer,
              params=cast(params), global_mapper=g, local_mapper=l)


def random_pipeline(seed: int = 0, dtype=jnp.float32, global_mapper=None, local_mapper=None, size: str = "tiny"):
  """An ElitePipeline of tiny random models (with a local mapper). Images from it are noise.

  Mapper files (e.g. trained with configs/tiny_stage*.py, which use these same models for the same seed) replace
  the random mappers.
  """
  from elite_jax.pipeline import ElitePipeline, MapperBundle
  parts = random_components(seed, dtype, size)
  for key, path, local in (("global_mapper", global_mapper, False), ("local_mapper", local_mapper, True)):
    if path:
      cfg, w = weights.load_mapper(path, parts["unet"].config, local=local)
      parts[key] = MapperBundle(cfg, weights.to_dtype(w["mapper"], dtype), weights.to_dtype(w["kv"], dtype))
  return ElitePipeline(scheduler_config=SD14_SCHEDULER, **parts)
