"""PyTorch state dicts -> Flax parameter trees, and ELITE mappers to and from the official .pt layout.

One rule covers diffusers' UNet and VAE and transformers' CLIP and ViT: a dotted key becomes a path whose numeric parts
join their parent (``down_blocks.0.attentions.1`` -> ``down_blocks_0/attentions_1``); ``weight`` becomes ``kernel``
(Linear transposed, Conv OIHW -> HWIO), ``scale`` (norms) or ``embedding`` (nn.Embedding). The result is checked
against the module's own parameter shapes (``jax.eval_shape`` of its init), so a wrong file fails with a message
that lists what is missing, unexpected or of the wrong shape, never deep inside a forward pass.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import flax.traverse_util as traverse_util
import jax
import numpy as np

from elite_jax.errors import InputError

Params = dict[str, Any]

# Old diffusers VAE attention names, as SD v1-4's files still have them.
VAE_RENAMES = ((r"\.query\.", ".to_q."), (r"\.key\.", ".to_k."), (r"\.value\.", ".to_v."),
               (r"\.proj_attn\.", ".to_out.0."))


def _flax_path(key: str) -> list[str]:
  out: list[str] = []
  for part in key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return out


def torch_to_flax(state: Mapping[str, np.ndarray], *, renames: Iterable[tuple[str, str]] = (),
                  strip_prefix: str = "", skip: Callable[[str], bool] = lambda k: False) -> Params:
  """Rename and re-lay a PyTorch state dict into a nested Flax parameter dict (numpy leaves)."""
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for key, value in state.items():
    if strip_prefix:
      if not key.startswith(strip_prefix):
        continue
      key = key[len(strip_prefix):]
    if skip(key):
      continue
    for pattern, repl in renames:
      key = re.sub(pattern, repl, key)
    path = _flax_path(key)
    leaf, module = path[-1], path[:-1]
    value = np.asarray(value)
    if leaf == "weight":
      if value.ndim == 4:
        leaf, value = "kernel", value.transpose(2, 3, 1, 0)
      elif value.ndim == 2 and module and module[-1].endswith("embedding"):
        leaf = "embedding"
      elif value.ndim == 2:
        leaf, value = "kernel", value.T
      elif value.ndim == 1:
        leaf = "scale"
    flat[tuple(module + [leaf])] = value
  return traverse_util.unflatten_dict(flat)


def check_against(params: Params, target: Any, what: str, *, allow_missing: Callable[[tuple], bool] = lambda p: False,
                  squeeze_1x1: bool = False) -> Params:
  """Keep the keys ``target`` (a tree of ShapeDtypeStruct/arrays) has; raise InputError on any mismatch.

  ``squeeze_1x1`` accepts (C, C, 1, 1) convolution kernels where a dense (C, C) kernel is expected (very old VAE
  attention weights were saved as 1x1 convolutions).
  """
  got = traverse_util.flatten_dict(params)
  want = traverse_util.flatten_dict(_unbox(target))
  missing = [p for p in want if p not in got and not allow_missing(p)]
  unexpected = [p for p in got if p not in want]
  wrong = []
  out = {}
  for path, spec in want.items():
    if path not in got:
      continue
    value = got[path]
    if squeeze_1x1 and value.ndim == 4 and value.shape[:2] == (1, 1) and len(spec.shape) == 2:
      value = value[0, 0]
    if tuple(value.shape) != tuple(spec.shape):
      wrong.append(f"{'/'.join(path)} {tuple(value.shape)} (expected {tuple(spec.shape)})")
    out[path] = value
  problems = []
  if missing:
    problems.append(f"missing {len(missing)}: " + ", ".join("/".join(p) for p in missing[:5]))
  if unexpected:
    problems.append(f"unexpected {len(unexpected)}: " + ", ".join("/".join(p) for p in unexpected[:5]))
  if wrong:
    problems.append(f"wrong shape {len(wrong)}: " + ", ".join(wrong[:5]))
  if problems:
    raise InputError(f"{what} does not fit the model: " + "; ".join(problems))
  return traverse_util.unflatten_dict(out)


def _unbox(tree: Any) -> Any:
  import flax.linen as nn
  return nn.meta.unbox(tree)


# ---------------------------------------------------------------------------------------------------------------
# ELITE mappers: the official .pt layout (spec 7)
# ---------------------------------------------------------------------------------------------------------------

def _attn_key(path: tuple[str, ...]) -> str:
  """('down_blocks_0', 'attentions_0', 'transformer_blocks_0', 'attn2') -> 'down_blocks_0_..._attn2'."""
  return "_".join(path)


def mapper_from_official(state: Mapping[str, np.ndarray], attn_paths: list[tuple[str, ...]], depth: int,
                         local: bool, what: str) -> Params:
  """An official global_mapper.pt / local_mapper.pt state dict -> {"mapper": ..., "kv": ...}.

  ``kv`` mirrors the UNet tree: each attn2 gets ``to_k``/``to_v`` kernels (global: they replace SD's) or
  ``to_k_local``/``to_v_local`` (local).
  """
  mapper: dict[tuple[str, ...], np.ndarray] = {}
  kv: dict[tuple[str, ...], np.ndarray] = {}
  names = {_attn_key(p): p for p in attn_paths}
  suffix = "_local" if local else ""
  mlp_re = re.compile(r"^(mapping(?:_patch)?_\d+)\.(\d+)\.(weight|bias)$")
  for key, value in state.items():
    value = np.asarray(value)
    m = mlp_re.match(key)
    if m:
      module, index, leaf = m.groups()
      idx = int(index)
      if idx % 3 == 1:  # LayerNorm
        leaf = "scale" if leaf == "weight" else leaf
      elif leaf == "weight":
        leaf, value = "kernel", value.T
      mapper[(module, f"layers_{idx}", leaf)] = value
      continue
    m = re.match(r"^(.*)_(to_k|to_v)\.weight$", key)
    if m and m.group(1) in names:
      kv[names[m.group(1)] + (m.group(2) + suffix, "kernel")] = value.T
      continue
    raise InputError(f"{what}: unexpected key {key!r} (is this an ELITE mapper checkpoint for this UNet?)")
  missing = [n for n in names if (names[n] + ("to_k" + suffix, "kernel")) not in kv]
  if missing:
    raise InputError(f"{what}: no key/value projections for {len(missing)} cross-attention layers "
                     f"(e.g. {missing[0]}); the checkpoint does not match this UNet")
  del depth  # the MLP depth is checked against the module by check_against
  return {"mapper": traverse_util.unflatten_dict(mapper), "kv": traverse_util.unflatten_dict(kv)}


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


def mapper_to_official(weights: Params, attn_paths: list[tuple[str, ...]], local: bool) -> dict[str, np.ndarray]:
  """{"mapper", "kv"} -> the official state dict, keys in the official files' order."""
  out: dict[str, np.ndarray] = {}
  for (module, layer, leaf), value in traverse_util.flatten_dict(jax.tree.map(np.asarray, weights["mapper"])).items():
    if leaf == "kernel":
      leaf, value = "weight", value.T
    elif leaf == "scale":
      leaf = "weight"
    out[f"{module}.{layer.split('_')[1]}.{leaf}"] = np.ascontiguousarray(value)
  kv = traverse_util.flatten_dict(jax.tree.map(np.asarray, weights["kv"]))
  suffix = "_local" if local else ""
  for path in attn_paths:
    for proj in ("to_k", "to_v"):
      out[f"{_attn_key(path)}_{proj}.weight"] = np.ascontiguousarray(kv[path + (proj + suffix, "kernel")].T)
  return {k: out[k] for k in sorted(out, key=official_key_order)}
