"""ELITE mapper files: the official ``global_mapper.pt`` / ``local_mapper.pt`` layout (spec 7), in and out, and our
``.safetensors`` (the same keys, plus the mapper config and kind as metadata).

The official state dict holds, per word i, ``mapping_i.N.{weight,bias}`` and ``mapping_patch_i.N.{weight,bias}`` (the
nn.Sequential indices of Linear, LayerNorm, LeakyReLU), then every attn2's ``<path>_to_k.weight`` /
``<path>_to_v.weight`` in diffusers 0.11's registration order (down blocks, up blocks, mid block), the path's dots
turned to underscores. A local mapper's file uses the same key names for its local K/V.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Mapping

import flax.traverse_util as traverse_util
import jax
import numpy as np
import safetensors
import safetensors.numpy

from elite_jax.concept import MapperBundle, kv_names, mapper_shapes
from elite_jax.errors import InputError
from elite_jax.files import atomic_path
from elite_jax.models.mappers import MapperConfig
from elite_jax.models.unet import UNetConfig
from elite_jax.types import Params
from elite_jax.weights import convert, torch_files

FORMAT = "elite-jax mapper"
_MLP_KEY = re.compile(r"^(mapping(?:_patch)?_\d+)\.(\d+)\.(weight|bias)$")


def _attn_key(path: tuple[str, ...]) -> str:
  """('down_blocks_0', 'attentions_0', 'transformer_blocks_0', 'attn2') -> 'down_blocks_0_..._attn2'."""
  return "_".join(path)


def official_key_order(key: str) -> tuple:
  """Sort key giving the official files' order: per word mapping_i then mapping_patch_i (layers, weight before bias),
  then every attn2's _to_k/_to_v in diffusers 0.11's registration order (down blocks, up blocks, mid block)."""
  m = re.match(r"^mapping(_patch)?_(\d+)\.(\d+)\.(weight|bias)$", key)
  if m:
    return (0, int(m.group(2)), m.group(1) is not None, int(m.group(3)), m.group(4) == "bias")
  m = re.match(r"^(down_blocks|up_blocks|mid_block)_?(\d*)_attentions_(\d+)_transformer_blocks_(\d+)_attn2_to_([kv])"
               r"(?:_local)?\.weight$", key)
  if m:
    block = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}[m.group(1)]
    return (1, block, int(m.group(2) or 0), int(m.group(3)), int(m.group(4)), m.group(5))
  return (2, key)


def mlp_from_official(state: Mapping[str, np.ndarray]) -> tuple[Params, dict[str, np.ndarray]]:
  """The mapping networks of an official state dict as a Flax tree, and the entries left (the K/V projections)."""
  mlp: dict[tuple[str, ...], np.ndarray] = {}
  rest = {}
  for key, value in state.items():
    m = _MLP_KEY.match(key)
    if not m:
      rest[key] = value
      continue
    module, index, leaf = m.groups()
    value, idx = np.asarray(value), int(index)
    if idx % 3 == 1:  # LayerNorm
      leaf = "scale" if leaf == "weight" else leaf
    elif leaf == "weight":
      leaf, value = "kernel", value.T
    mlp[(module, f"layers_{idx}", leaf)] = value
  return traverse_util.unflatten_dict(mlp), rest


def from_official_state(state: Mapping[str, np.ndarray], unet_config: UNetConfig, kind: str,
                        what: str) -> tuple[Params, Params]:
  """An official state dict -> (MLP params, K/V tree in the UNet layout), numpy, not yet shape-checked."""
  mlp, rest = mlp_from_official(state)
  kv: dict[tuple[str, ...], np.ndarray] = {}
  names = {_attn_key(p): p for p, _ in unet_config.cross_attention_layers()}
  k_name, v_name = kv_names(kind)
  for key, value in rest.items():
    m = re.match(r"^(.*)_(to_k|to_v)\.weight$", key)
    if m and m.group(1) in names:
      kv[names[m.group(1)] + (k_name if m.group(2) == "to_k" else v_name, "kernel")] = np.asarray(value).T
      continue
    raise InputError(f"{what}: unexpected key {key!r} (is this an ELITE mapper checkpoint for this UNet?)")
  missing = [n for n in names if (names[n] + (k_name, "kernel")) not in kv]
  if missing:
    raise InputError(f"{what}: no key/value projections for {len(missing)} cross-attention layers "
                     f"(e.g. {missing[0]}); the checkpoint does not match this UNet")
  return mlp, traverse_util.unflatten_dict(kv)


def official_state(bundle: MapperBundle, unet_config: UNetConfig) -> dict[str, np.ndarray]:
  """A bundle (or a bundle-shaped tree such as its gradients) -> the official state dict, in the files' key order."""
  out: dict[str, np.ndarray] = {}
  for (module, layer, leaf), value in traverse_util.flatten_dict(jax.tree.map(np.asarray, bundle.mlp)).items():
    if leaf == "kernel":
      leaf, value = "weight", value.T
    elif leaf == "scale":
      leaf = "weight"
    out[f"{module}.{layer.split('_')[1]}.{leaf}"] = np.ascontiguousarray(value)
  kv = traverse_util.flatten_dict(jax.tree.map(np.asarray, bundle.kv))
  for path, _ in unet_config.cross_attention_layers():
    for proj, name in zip(("to_k", "to_v"), kv_names(bundle.kind)):
      out[f"{_attn_key(path)}_{proj}.weight"] = np.ascontiguousarray(kv[path + (name, "kernel")].T)
  return {k: out[k] for k in sorted(out, key=official_key_order)}


def _config_from_state(state: Mapping[str, np.ndarray], meta: dict[str, str], what: str) -> MapperConfig:
  if "mapper_config" in meta:
    try:
      return MapperConfig.from_dict(json.loads(meta["mapper_config"]))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
      raise InputError(f"{what}: unreadable mapper_config metadata ({type(e).__name__}: {e})") from None
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


def load_mapper(path: str | os.PathLike, unet_config: UNetConfig, kind: str) -> MapperBundle:
  """An ELITE mapper file -> a float32 (numpy) bundle, checked against the UNet's cross-attention layers.

  Accepts the official ``global_mapper.pt`` / ``local_mapper.pt`` and our ``.safetensors`` exports (same keys).
  """
  path = Path(os.path.expanduser(str(path)))
  what = f"{kind} mapper {path}"
  if not path.is_file():
    raise InputError(f"missing file: {path}")
  state = torch_files.load_state_dict(path)
  meta = _safetensors_metadata(path) if path.suffix == ".safetensors" else {}
  if meta.get("kind") and meta["kind"] != kind:
    raise InputError(f"{path} is a {meta['kind']} mapper, given as the {kind} one")
  config = _config_from_state(state, meta, what)
  state = {k: np.asarray(v, np.float32) for k, v in state.items()}
  mlp, kv = from_official_state(state, unet_config, kind, what)
  shapes = mapper_shapes(config, kind, unet_config)
  return MapperBundle(kv=convert.check_against(kv, shapes.kv, f"{what} (cross-attention K/V)"),
                      mlp=convert.check_against(mlp, shapes.mlp, what), config=config, kind=kind)


def save_mapper(path: str | os.PathLike, bundle: MapperBundle, unet_config: UNetConfig) -> Path:
  """Write a mapper as .safetensors (official key layout + config metadata) or, for a .pt path, the official file.

  Either way the file is written beside ``path`` and renamed: a crash never leaves a half-written mapper.
  """
  path = Path(path)
  state = official_state(bundle, unet_config)
  if path.suffix == ".pt":
    torch_files.save_torch_state_dict(state, path)
    return path
  meta = {"format": FORMAT, "kind": bundle.kind, "mapper_config": json.dumps(dataclasses.asdict(bundle.config))}
  with atomic_path(path) as tmp:
    safetensors.numpy.save_file(state, str(tmp), metadata=meta)
  return path


def export_official(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
  """Our .safetensors mapper -> the official .pt file (the same keys in the official order); needs torch."""
  src, dest = Path(src), Path(dest)
  if src.suffix != ".safetensors":
    raise InputError(f"expected an elite-jax .safetensors mapper, got {src}")
  if dest.suffix != ".pt":
    raise InputError(f"the destination must be a .pt file, got {dest}")
  if not src.is_file():
    raise InputError(f"missing file: {src}")
  state = torch_files.load_state_dict(src)
  if not any(k.startswith("mapping_0.") for k in state):
    raise InputError(f"{src} is not an ELITE mapper (no mapping_0.* tensors)")
  # safetensors stores keys sorted by name; the official files list them in module order
  state = {k: state[k] for k in sorted(state, key=official_key_order)}
  torch_files.save_torch_state_dict(state, dest)
  return dest


def _safetensors_metadata(path: Path) -> dict[str, str]:
  try:
    with safetensors.safe_open(str(path), framework="np") as f:
      return f.metadata() or {}
  except Exception:  # unreadable headers are reported by load_state_dict with a clearer message
    return {}
