"""Pretrained models from their files: diffusers-format component folders, CLIP and DINO checkpoints, the hub.

Every loader returns ``(module, params)`` with numpy float32 parameter leaves checked against the module's own
shapes; callers cast and place them (``jax.device_put``, with shardings in training). No torch is needed: safetensors
and ``.bin`` pickles are read by ``elite_jax.weights.torch_files``. The Stable Diffusion bundle that puts the
components together is ``elite_jax.stable_diffusion``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import huggingface_hub
import numpy as np
from transformers import CLIPTokenizer

from elite_jax.errors import InputError
from elite_jax.models.clip import (CLIPModel, CLIPTextTransformer, CLIPVisionTransformer, text_config_from_transformers,
                                   vision_config_from_transformers)
from elite_jax.models.controlnet import ControlNet, ControlNetConfig
from elite_jax.models.ip_adapter import CLIPVisionWithProjection
from elite_jax.models.unet import UNet, UNetConfig
from elite_jax.models.vae import AutoencoderKL, VAEConfig
from elite_jax.models.vit import ViTConfig, ViTModel
from elite_jax.types import Params
from elite_jax.weights import convert, torch_files

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
        return torch_files.load_state_dict(single)
      index = folder / f"{name}{ext}.index.json"
      if index.is_file():
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
          state.update(torch_files.load_state_dict(folder / shard))
        return state
  raise InputError(f"no weights in {folder} (expected diffusion_pytorch_model.safetensors, model.safetensors or "
                   f"pytorch_model.bin)")


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

def _checked(module, params: Params, what: str, **kw) -> Params:
  """``params`` restricted to the module's own tree; InputError naming what is missing or of the wrong shape."""
  return convert.check_against(params, module.param_shapes(), what, **kw)


def load_unet(folder: Path, **module_kw) -> tuple[UNet, Params]:
  """A diffusers UNet2DConditionModel folder; ``module_kw`` (dtype, attention_impl, remat) go to the module."""
  module = UNet(UNetConfig.from_diffusers(read_json(folder / "config.json")), **module_kw)
  return module, _checked(module, convert.torch_to_flax(read_weights(folder)), f"UNet weights in {folder}")


def load_controlnet(folder: Path, **module_kw) -> tuple[ControlNet, Params]:
  """A diffusers ControlNetModel folder (SD 1.x canny/depth/openpose... ControlNets)."""
  cfg = read_json(folder / "config.json")
  if cfg.get("_class_name", "ControlNetModel") != "ControlNetModel":
    raise InputError(f"{folder} holds a {cfg['_class_name']}, not a ControlNetModel")
  module = ControlNet(ControlNetConfig.from_diffusers(cfg), **module_kw)
  return module, _checked(module, convert.torch_to_flax(read_weights(folder)), f"ControlNet weights in {folder}")


def load_vae(folder: Path, **module_kw) -> tuple[AutoencoderKL, Params]:
  """A diffusers AutoencoderKL folder (current or SD v1-4's old attention names)."""
  module = AutoencoderKL(VAEConfig.from_diffusers(read_json(folder / "config.json")), **module_kw)
  params = convert.torch_to_flax(read_weights(folder), renames=convert.VAE_RENAMES)
  return module, _checked(module, params, f"VAE weights in {folder}", squeeze_1x1=True)


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


def load_text_encoder(folder: Path, **module_kw) -> tuple[CLIPTextTransformer, Params]:
  """A CLIPTextModel (SD's text_encoder/) or CLIPModel checkpoint; the text transformer alone."""
  cfg, state = _clip_state(folder, "text_model")
  module = CLIPTextTransformer(text_config_from_transformers(cfg), **module_kw)
  params = convert.torch_to_flax(state, skip=lambda k: k.endswith("position_ids"))
  return module, _checked(module, params, f"text encoder weights in {folder}")


def load_image_encoder(folder: Path, *, scan_layers: bool = False, **module_kw):
  """Any mapper image encoder from a transformers checkpoint, by its config's model_type: a CLIPVisionModel or
  CLIPModel (openai/clip-vit-large-patch14 layout; OpenCLIP H/14 and bigG/14 converted to it), a Dinov2Model /
  Dinov2WithRegistersModel, or a SiglipVisionModel / SiglipModel. ``scan_layers``: the layers as one nn.scan
  (their parameters stacked, models/scan.py). Returns (module, params)."""
  return load_image_encoder_and_processor(folder, scan_layers=scan_layers, **module_kw)[:2]


def load_image_encoder_and_processor(folder: Path, *, scan_layers: bool = False, **module_kw):
  """``load_image_encoder`` and the encoder's ImageProcessorConfig (preprocessor_config.json, else the family's
  transformers defaults)."""
  from elite_jax import image_processors  # noqa: PLC0415 (image_processors imports the models, not the loaders)
  from elite_jax.models import encoders, scan  # noqa: PLC0415
  cfg = read_json(folder / "config.json")
  model_type = cfg.get("model_type", "")
  if model_type in ("dinov2", "dinov2_with_registers"):
    processor = image_processors.read_config(folder, "dinov2", int(cfg.get("image_size", 518)))
    config = encoders.Dinov2Config.from_transformers(cfg, input_size=processor.output_size[0])
    module = encoders.Dinov2Model(config, scan_layers=scan_layers, **module_kw)
    state = read_weights(folder)
    if any(k.startswith("dinov2.") for k in state):
      state = {k[len("dinov2."):]: v for k, v in state.items() if k.startswith("dinov2.")}
    params = convert.torch_to_flax(state, skip=lambda k: k.startswith(("embeddings.mask_token", "classifier.")))
  elif model_type in ("siglip_vision_model", "siglip"):
    config = encoders.SiglipVisionConfig.from_transformers(cfg)
    processor = image_processors.read_config(folder, "siglip", config.image_size)
    module = encoders.SiglipVisionModel(config, scan_layers=scan_layers, **module_kw)
    state = read_weights(folder)
    if any(k.startswith("vision_model.") for k in state):
      state = {k[len("vision_model."):]: v for k, v in state.items() if k.startswith("vision_model.")}
    params = convert.torch_to_flax(state, skip=lambda k: k.endswith("position_ids") or k.startswith("head."))
  else:
    cfg, state = _clip_state(folder, "vision_model")
    module = CLIPVisionTransformer(vision_config_from_transformers(cfg), scan_layers=scan_layers, **module_kw)
    processor = image_processors.read_config(folder, "clip", module.config.image_size)
    params = convert.torch_to_flax(state, skip=lambda k: k.endswith("position_ids"))
  if scan_layers:
    params = scan.scan_tree(params, encoders.layers_path(module), module.config.num_hidden_layers)
  return module, _checked(module, params, f"image encoder weights in {folder}"), processor


def load_image_encoder_with_projection(folder: Path, **module_kw) -> tuple[CLIPVisionWithProjection, Params]:
  """A CLIPVisionModelWithProjection checkpoint (IP-Adapter's ``image_encoder/``, or a CLIPModel): the vision tower
  and its visual projection."""
  cfg = read_json(folder / "config.json")
  state = read_weights(folder)
  if "visual_projection.weight" not in state:
    raise InputError(f"{folder} has no visual_projection (IP-Adapter needs a CLIPVisionModelWithProjection)")
  if not any(k.startswith("vision_model.") for k in state):
    raise InputError(f"{folder} holds no vision_model weights (is it a CLIP checkpoint?)")
  config = vision_config_from_transformers(cfg)
  config = dataclasses.replace(config, projection_dim=int(state["visual_projection.weight"].shape[0]))
  module = CLIPVisionWithProjection(config, **module_kw)
  params = convert.torch_to_flax({k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_proj"))},
                                 skip=lambda k: k.endswith("position_ids"))
  return module, _checked(module, params, f"image encoder weights in {folder}")


def load_clip(folder: Path, **module_kw) -> tuple[CLIPModel, Params]:
  """A full CLIPModel (both towers and projections), for the CLIP-I / CLIP-T metrics."""
  cfg = read_json(folder / "config.json")
  if "text_config" not in cfg or "vision_config" not in cfg:
    raise InputError(f"{folder} is not a CLIPModel checkpoint (its config has no text_config/vision_config)")
  text, vision = text_config_from_transformers(cfg), vision_config_from_transformers(cfg)
  module = CLIPModel(text, vision, cfg.get("projection_dim", 512), **module_kw)
  params = convert.torch_to_flax(read_weights(folder), skip=lambda k: k.endswith("position_ids") or k == "logit_scale")
  return module, _checked(module, params, f"CLIP weights in {folder}")


# transformers >= 5 names ViT layers differently in memory (``layers.N.attention.q_proj``, ``mlp.fc1``...) and saves
# the hub layout; a state dict taken from such a model in memory is renamed back to the hub layout.
_VIT_RENAMES = ((r"^layers\.", "encoder.layer."), (r"\.attention\.q_proj\.", ".attention.attention.query."),
                (r"\.attention\.k_proj\.", ".attention.attention.key."),
                (r"\.attention\.v_proj\.", ".attention.attention.value."),
                (r"\.attention\.o_proj\.", ".attention.output.dense."), (r"\.mlp\.fc1\.", ".intermediate.dense."),
                (r"\.mlp\.fc2\.", ".output.dense."))


def load_dino(folder: Path, layer_norm_eps: float | None = None, **module_kw) -> tuple[ViTModel, Params]:
  """A ViTModel checkpoint (facebook/dino-vits16 layout: config.json + safetensors/bin), for the DINO-I metric.

  A ``vit.`` prefix (ViTForImageClassification) is stripped; the pooler, mask token and classifier are not used.
  ``layer_norm_eps`` overrides the config's (facebook/dino-vit* say transformers' default 1e-12; DINO's own models,
  torch.hub ``dino_vits16``, use 1e-6).
  """
  cfg = read_json(folder / "config.json")
  config = ViTConfig.from_transformers(cfg)
  if layer_norm_eps is not None:
    config = dataclasses.replace(config, layer_norm_eps=float(layer_norm_eps))
  module = ViTModel(config, **module_kw)
  state = read_weights(folder)
  if any(k.startswith("vit.") for k in state):
    state = {k[len("vit."):]: v for k, v in state.items() if k.startswith("vit.")}
  unused = ("pooler.", "classifier.", "embeddings.mask_token")
  params = convert.torch_to_flax(state, renames=_VIT_RENAMES, skip=lambda k: k.startswith(unused))
  return module, _checked(module, params, f"DINO ViT weights in {folder}")


def load_tokenizer(folder: Path) -> CLIPTokenizer:
  if not (folder / "vocab.json").is_file():
    raise InputError(f"no tokenizer in {folder} (expected vocab.json and merges.txt)")
  return CLIPTokenizer.from_pretrained(str(folder))
