"""Loading pretrained models: diffusers-format Stable Diffusion folders, CLIP checkpoints, the Hugging Face hub.

Every loader returns ``(module, params)`` with numpy parameter leaves checked against the module's shapes; callers cast
and place them (``jax.device_put``, with shardings in training). No torch is needed: safetensors are read with
``safetensors.numpy`` and ``.bin`` pickles by ``elite_jax.torch_io``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from elite_jax import convert, torch_io
from elite_jax.errors import InputError
from elite_jax.models.clip import (CLIPModel, CLIPTextTransformer, CLIPVisionTransformer, text_config_from_transformers,
                                   vision_config_from_transformers)
from elite_jax.models.mappers import GlobalMapper, LocalMapper, MapperConfig
from elite_jax.models.unet import UNet, UNetConfig
from elite_jax.models.vae import AutoencoderKL, VAEConfig
from elite_jax.models.vit import ViTConfig, ViTModel

Params = dict[str, Any]

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


# ---------------------------------------------------------------------------------------------------------------
# Files: local folders and the hub
# ---------------------------------------------------------------------------------------------------------------

def _looks_like_repo_id(name: str) -> bool:
  parts = name.split("/")
  return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _hub_weight_patterns(files: list[str], subfolders: tuple[str, ...]) -> list[str]:
  """Config files plus, per subfolder, one full-precision weight file (safetensors preferred, no fp16 variants)."""
  patterns = ["*.json", "*.txt"]
  for sub in subfolders:
    prefix = f"{sub}/" if sub else ""
    for ext in (".safetensors", ".bin"):
      chosen = [f for f in files if f.startswith(prefix) and f.count("/") == prefix.count("/")
                and any(f == f"{prefix}{n}{ext}" or (f.startswith(f"{prefix}{n}-") and f.endswith(ext))
                        for n in _WEIGHT_NAMES)]
      chosen += [f for f in files if f.startswith(prefix) and f.endswith(f"{ext}.index.json")]
      if chosen:
        patterns += chosen
        break
  return patterns


def resolve(name_or_path: str | os.PathLike, subfolders: tuple[str, ...] = ("",)) -> Path:
  """A local folder, or a hub repo id downloaded (or taken from the cache) with huggingface_hub."""
  path = Path(os.path.expanduser(str(name_or_path)))
  if path.is_dir():
    return path
  name = str(name_or_path)
  if path.exists() or not _looks_like_repo_id(name):
    raise InputError(f"no such model folder: {name}")
  import huggingface_hub
  try:
    files = huggingface_hub.list_repo_files(name)
  except Exception as remote_error:  # offline, no such repo, gated...
    try:
      return Path(huggingface_hub.snapshot_download(name, local_files_only=True))
    except Exception:
      raise InputError(f"cannot fetch {name} from the Hugging Face hub ({type(remote_error).__name__}: "
                       f"{str(remote_error).splitlines()[0] if str(remote_error) else 'no network?'}); "
                       f"download it on a machine with network access and pass its local folder") from None
  return Path(huggingface_hub.snapshot_download(name, allow_patterns=_hub_weight_patterns(files, subfolders)))


def read_json(path: Path) -> dict:
  if not path.is_file():
    raise InputError(f"missing file: {path}")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"not a valid JSON file: {path} ({e})") from None


def read_weights(folder: Path) -> dict[str, np.ndarray]:
  """The PyTorch state dict in ``folder``: one file or index-sharded, safetensors preferred over .bin."""
  for ext in (".safetensors", ".bin"):
    for name in _WEIGHT_NAMES:
      single = folder / f"{name}{ext}"
      if single.is_file():
        return torch_io.load_state_dict(single)
      index = folder / f"{name}{ext}.index.json"
      if index.is_file():
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
          state.update(torch_io.load_state_dict(folder / shard))
        return state
  raise InputError(f"no weights in {folder} (expected diffusion_pytorch_model.safetensors, model.safetensors or "
                   f"pytorch_model.bin)")


def to_dtype(params: Params, dtype: Any) -> Params:
  """Floating leaves to ``dtype`` as jax arrays (integers untouched)."""
  def cast(x):
    x = jnp.asarray(x)
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, params)


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

def _fit(module, params: Params, inputs: tuple, what: str, **kw) -> Params:
  shapes = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *inputs)
  return convert.check_against(params, shapes["params"], what, **kw)


def load_unet(folder: Path, dtype: Any = jnp.float32, **module_kw) -> tuple[UNet, Params]:
  config = UNetConfig.from_diffusers(read_json(folder / "config.json"))
  module = UNet(config, dtype=dtype, **module_kw)
  params = convert.torch_to_flax(read_weights(folder))
  x = jax.ShapeDtypeStruct((1, 8 * 2 ** len(config.block_out_channels), 8 * 2 ** len(config.block_out_channels),
                            config.in_channels), jnp.float32)
  inputs = (x, jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1, 77, config.cross_attention_dim),
                                                                             jnp.float32))
  return module, _fit(module, params, inputs, f"UNet weights in {folder}")


def load_vae(folder: Path, dtype: Any = jnp.float32) -> tuple[AutoencoderKL, Params]:
  config = VAEConfig.from_diffusers(read_json(folder / "config.json"))
  module = AutoencoderKL(config, dtype=dtype)
  params = convert.torch_to_flax(read_weights(folder), renames=convert.VAE_RENAMES)
  size = 2 ** len(config.block_out_channels)
  x = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
  return module, _fit(module, params, (x,), f"VAE weights in {folder}", squeeze_1x1=True)


def _clip_state(folder: Path, tower: str) -> tuple[dict, dict[str, np.ndarray]]:
  """The config and the ``tower`` ('text_model' / 'vision_model') weights without their prefix.

  Hub checkpoints (SD's text_encoder, openai/clip-*) prefix every key with the tower; transformers 5 saves a bare
  CLIPTextModel / CLIPVisionModel without it.
  """
  cfg = read_json(folder / "config.json")
  state = read_weights(folder)
  prefix = f"{tower}."
  if any(k.startswith(prefix) for k in state):
    return cfg, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  bare = {"text_model": "clip_text_model", "vision_model": "clip_vision_model"}[tower]
  if cfg.get("model_type") == bare and any(k.startswith("embeddings.") for k in state):
    return cfg, state
  raise InputError(f"{folder} holds no {tower} weights (is it a CLIP checkpoint?)")


def load_text_encoder(folder: Path, dtype: Any = jnp.float32) -> tuple[CLIPTextTransformer, Params]:
  """A CLIPTextModel (SD's text_encoder/) or CLIPModel checkpoint; the text transformer alone."""
  cfg, state = _clip_state(folder, "text_model")
  module = CLIPTextTransformer(text_config_from_transformers(cfg), dtype=dtype)
  params = convert.torch_to_flax(state, skip=lambda k: k.endswith("position_ids"))
  ids = jax.ShapeDtypeStruct((1, module.config.max_position_embeddings), jnp.int32)
  return module, _fit(module, params, (ids,), f"text encoder weights in {folder}")


def load_image_encoder(folder: Path, dtype: Any = jnp.float32) -> tuple[CLIPVisionTransformer, Params]:
  """A CLIPVisionModel or CLIPModel checkpoint (openai/clip-vit-large-patch14 layout); the vision transformer."""
  cfg, state = _clip_state(folder, "vision_model")
  module = CLIPVisionTransformer(vision_config_from_transformers(cfg), dtype=dtype)
  params = convert.torch_to_flax(state, skip=lambda k: k.endswith("position_ids"))
  size = module.config.image_size
  pixels = jax.ShapeDtypeStruct((1, size, size, module.config.num_channels), jnp.float32)
  return module, _fit(module, params, (pixels,), f"image encoder weights in {folder}")


def load_clip(folder: Path, dtype: Any = jnp.float32) -> tuple[CLIPModel, Params]:
  """A full CLIPModel (both towers and projections), for the CLIP-I / CLIP-T metrics."""
  cfg = read_json(folder / "config.json")
  if "text_config" not in cfg or "vision_config" not in cfg:
    raise InputError(f"{folder} is not a CLIPModel checkpoint (its config has no text_config/vision_config)")
  text, vision = text_config_from_transformers(cfg), vision_config_from_transformers(cfg)
  module = CLIPModel(text, vision, cfg.get("projection_dim", 512), dtype=dtype)
  params = convert.torch_to_flax(read_weights(folder), skip=lambda k: k.endswith("position_ids") or k == "logit_scale")
  ids = jax.ShapeDtypeStruct((1, text.max_position_embeddings), jnp.int32)
  pixels = jax.ShapeDtypeStruct((1, vision.image_size, vision.image_size, vision.num_channels), jnp.float32)
  return module, _fit(module, params, (ids, pixels), f"CLIP weights in {folder}")


# transformers >= 5 names ViT layers differently in memory (``layers.N.attention.q_proj``, ``mlp.fc1``...) and saves
# the hub layout; a state dict taken from such a model in memory is renamed back to the hub layout.
_VIT_RENAMES = ((r"^layers\.", "encoder.layer."), (r"\.attention\.q_proj\.", ".attention.attention.query."),
                (r"\.attention\.k_proj\.", ".attention.attention.key."),
                (r"\.attention\.v_proj\.", ".attention.attention.value."),
                (r"\.attention\.o_proj\.", ".attention.output.dense."), (r"\.mlp\.fc1\.", ".intermediate.dense."),
                (r"\.mlp\.fc2\.", ".output.dense."))


def load_dino(folder: Path, dtype: Any = jnp.float32, layer_norm_eps: float | None = None) -> tuple[ViTModel, Params]:
  """A ViTModel checkpoint (facebook/dino-vits16 layout: config.json + safetensors/bin), for the DINO-I metric.

  A ``vit.`` prefix (ViTForImageClassification) is stripped; the pooler, mask token and classifier are not used.
  ``layer_norm_eps`` overrides the config's (facebook/dino-vit* say transformers' default 1e-12; DINO's own models,
  torch.hub ``dino_vits16``, use 1e-6).
  """
  cfg = read_json(folder / "config.json")
  config = ViTConfig.from_transformers(cfg)
  if layer_norm_eps is not None:
    config = dataclasses.replace(config, layer_norm_eps=float(layer_norm_eps))
  module = ViTModel(config, dtype=dtype)
  state = read_weights(folder)
  if any(k.startswith("vit.") for k in state):
    state = {k[len("vit."):]: v for k, v in state.items() if k.startswith("vit.")}
  unused = ("pooler.", "classifier.", "embeddings.mask_token")
  params = convert.torch_to_flax(state, renames=_VIT_RENAMES, skip=lambda k: k.startswith(unused))
  pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
  return module, _fit(module, params, (pixels,), f"DINO ViT weights in {folder}")


def load_tokenizer(folder: Path):
  from transformers import CLIPTokenizer
  if not (folder / "vocab.json").is_file():
    raise InputError(f"no tokenizer in {folder} (expected vocab.json and merges.txt)")
  return CLIPTokenizer.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------------------------
# ELITE mappers: the official .pt files and our own .safetensors (same keys, plus the mapper config as metadata)
# ---------------------------------------------------------------------------------------------------------------

def _mapper_config_from_state(state: dict[str, np.ndarray], meta: dict[str, str], what: str) -> MapperConfig:
  if "mapper_config" in meta:
    cfg = json.loads(meta["mapper_config"])
    return MapperConfig(**{**cfg, "tapped_layers": tuple(cfg["tapped_layers"])})
  words = sorted({int(k.split(".")[0].rsplit("_", 1)[1]) for k in state if k.startswith("mapping_") and "." in k})
  linears = sorted({int(k.split(".")[1]) for k in state if k.startswith("mapping_0.") and k.endswith(".weight")
                    and state[k].ndim == 2})
  if not words or not linears or "mapping_0.0.weight" not in state:
    raise InputError(f"{what} is not an ELITE mapper checkpoint (no mapping_0.* tensors)")
  first, last = state["mapping_0.0.weight"], state[f"mapping_0.{linears[-1]}.weight"]
  if words != list(range(5)):
    raise InputError(f"{what} has {len(words)} words; without elite-jax metadata only ELITE's 5 (layers 24, 4, 8, "
                     f"12, 16) can be inferred")
  return MapperConfig(input_dim=first.shape[1], hidden_dim=first.shape[0], output_dim=last.shape[0],
                      depth=len(linears) - 1)


def load_mapper(path: str | os.PathLike, unet_config: UNetConfig, *, local: bool,
                ) -> tuple[MapperConfig, Params]:
  """An ELITE mapper file -> (config, {"mapper": MLP params, "kv": attn2 K/V tree}), checked against the UNet.

  Accepts the official ``global_mapper.pt`` / ``local_mapper.pt`` and our ``.safetensors`` exports (same keys).
  """
  path = Path(os.path.expanduser(str(path)))
  what = f"{'local' if local else 'global'} mapper {path}"
  if not path.is_file():
    raise InputError(f"missing file: {path}")
  state = torch_io.load_state_dict(path)
  meta = _safetensors_metadata(path) if path.suffix == ".safetensors" else {}
  if meta.get("kind") and meta["kind"] != ("local" if local else "global"):
    raise InputError(f"{path} is a {meta['kind']} mapper, given as the {'local' if local else 'global'} one")
  config = _mapper_config_from_state(state, meta, what)
  state = {k: np.asarray(v, np.float32) for k, v in state.items()}
  weights = convert.mapper_from_official(state, unet_config.cross_attention_paths(), config.depth, local, what)
  mapper_cls = LocalMapper if local else GlobalMapper
  feats = [jax.ShapeDtypeStruct((1, 2, config.input_dim), jnp.float32)] * config.num_words
  shapes = jax.eval_shape(lambda f: mapper_cls(config).init(jax.random.key(0), f), feats)["params"]
  weights["mapper"] = convert.check_against(weights["mapper"], shapes, what)
  weights["kv"] = convert.check_against(weights["kv"], kv_shapes(unet_config, local),
                                       f"{what} (cross-attention K/V)")
  return config, weights


def kv_shapes(unet_config: UNetConfig, local: bool) -> Params:
  """The attn2 K/V kernel shapes of this UNet: (cross_attention_dim, inner) per layer."""
  from flax import traverse_util
  flat = {}
  suffix = "_local" if local else ""
  for path in unet_config.cross_attention_paths():
    block = path[0]
    level = int(block.split("_")[-1]) if block != "mid_block" else len(unet_config.block_out_channels) - 1
    chans = unet_config.block_out_channels if block.startswith("down") or block == "mid_block" \
        else unet_config.block_out_channels[::-1]
    inner = chans[level]
    for proj in ("to_k", "to_v"):
      flat[path + (proj + suffix, "kernel")] = jax.ShapeDtypeStruct((unet_config.cross_attention_dim, inner),
                                                                     jnp.float32)
  return traverse_util.unflatten_dict(flat)


def save_mapper(path: str | os.PathLike, config: MapperConfig, weights: Params, unet_config: UNetConfig, *,
                local: bool) -> Path:
  """Write a mapper as .safetensors (official key layout + config metadata) or, for a .pt path, the official file."""
  path = Path(path)
  state = convert.mapper_to_official(weights, unet_config.cross_attention_paths(), local)
  if path.suffix == ".pt":
    torch_io.save_torch_state_dict(state, path)
    return path
  meta = {"format": "elite-jax mapper", "kind": "local" if local else "global",
          "mapper_config": json.dumps(dataclasses.asdict(config))}
  tmp = path.with_name(f".{path.name}.tmp")
  safetensors.numpy.save_file(state, str(tmp), metadata=meta)
  os.replace(tmp, path)  # atomic: a crash never leaves a half-written mapper under the real name
  return path


def _safetensors_metadata(path: Path) -> dict[str, str]:
  try:
    with safetensors.safe_open(str(path), framework="np") as f:
      return f.metadata() or {}
  except Exception:  # unreadable headers are reported by load_state_dict with a clearer message
    return {}
