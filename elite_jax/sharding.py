"""Device mesh and the one table that places parameters and activations on it.

Parameters carry logical axis names (elite_jax.models.layers); ``RULES`` maps each to mesh axes. The mesh has three
axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism that also shards parameters and optimizer state)
and ``tensor`` (model parallelism over hidden/head dimensions). A dimension that a mesh axis does not divide is left
unsharded, so tiny test models and odd channel counts (the UNet's 4 output channels) place without special cases.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from elite_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension of data (and so of activations): the train step's inputs are placed with it and XLA's sharding
# propagation carries it through the models, so no activation needs a constraint of its own.
BATCH = ("data", "fsdp")

# logical parameter axis -> mesh axis (None: replicated). The single place that decides where parameters live.
RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("vocab", None),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; -1 in one axis takes all the devices the others leave. Without a -1, a mesh
  smaller than the machine uses its first devices (handy on one host; a pod wants every device used)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sum(s == -1 for s in sizes) > 1:
    raise InputError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
    raise InputError(f"mesh data={data} fsdp={fsdp} tensor={tensor} does not fit {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  need = int(np.prod(sizes))
  if need > len(devices) or (need < len(devices) and jax.process_count() > 1):
    raise InputError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {need} devices, have {len(devices)}")
  devices = devices[:need]
  # Auto axes: GSPMD propagates shardings through convolutions without per-op annotations.
  auto = (jax.sharding.AxisType.Auto,) * 3
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
  # TPU slices joined by the data-center network: data parallelism across them (one gradient all-reduce per step
  # over the slow links), fsdp and tensor within each, on its fast interconnect.
  if sizes[0] % slices or need != len(devices):
    raise InputError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} on {slices} TPU slices: data must be "
                     f"a multiple of {slices} (it runs across slices) and the mesh must use all {len(devices)} devices")
  from jax.experimental import mesh_utils  # noqa: PLC0415
  grid = mesh_utils.create_hybrid_device_mesh((sizes[0] // slices, sizes[1], sizes[2]), (slices, 1, 1), devices)
  return Mesh(grid, MESH_AXES, axis_types=auto)


def _divisible_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drop mesh axes from dimensions they do not divide (and from dimensions beyond the array's rank)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def logical_shardings(abstract: Any, mesh: Mesh, rules=RULES) -> Any:
  """NamedShardings for a tree of (possibly LogicallyPartitioned-boxed) abstract parameters."""
  specs = nn.get_partition_spec(abstract)
  shapes = nn.meta.unbox(abstract)
  with nn.logical_axis_rules(rules):
    mesh_specs = jax.tree.map(lambda s: nn.logical_to_mesh_axes(s) if isinstance(s, P) else P(), specs,
                              is_leaf=lambda x: isinstance(x, P))
  return jax.tree.map(lambda s, a: NamedSharding(mesh, _divisible_spec(s, a.shape, mesh)), mesh_specs, shapes,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(tree: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch dimension is split."""
  return int(np.prod([mesh.shape[a] for a in BATCH]))


def spec_summary(shardings: Any) -> dict[str, tuple]:
  """{param path: PartitionSpec as a tuple of mesh axes} of a tree of NamedShardings (dicts, bundles...), for logs
  and the golden sharding test."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {"/".join(_key_name(k) for k in path): tuple(v.spec) for path, v in flat}


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)
