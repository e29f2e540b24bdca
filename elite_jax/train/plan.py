"""The training step compiled for a TPU topology (or NVIDIA GPUs) on a machine without one, and what it needs per chip.

libtpu compiles for a named topology from any host (``jax.experimental.topologies``); the step is the one
``program.build`` makes for training (``abstract=True``: the same function, shapes instead of weights), on a mesh of
the topology's devices built by ``sharding.make_mesh`` from ``config.mesh``. XLA's own analyses give the memory per
device (arguments, outputs, temporaries, donated), the FLOPs and a time estimate; the program text gives its
collectives. So a run that cannot fit fails here, before a pod is rented (as MaxText's train_compile.py). GPUs of
one host (``h100-8``) compile the same way through the CUDA plugin, from a description of the GPU instead of a
device (``_GPU_TARGETS``); XLA gives their memory but no FLOPs or time estimate there.

    elite-train --config configs/stage1_global.py --aot v5e-16 [--aot_max_batch]
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from elite_jax import sharding
from elite_jax.errors import InputError
from elite_jax.models import attention
from elite_jax.train import program as program_lib

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published figures per chip: HBM and peak dense bf16 FLOP/s."""
  name: str
  hbm_bytes: int
  peak_flops: float


# By the device_kind libtpu reports.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12),
    "NVIDIA H100 80GB HBM3": Chip("h100", 80 * GiB, 989e12),
}

# What XLA's GPU compiler needs to know of a GPU it cannot see (a GpuTargetConfigProto, text form), written from the
# H100 SXM5's published figures: compute capability 9.0, 132 SMs, its shared memory and register limits, 80 GB of
# HBM3 at 3.35 TB/s, 50 MiB of L2.
_GPU_TARGETS = {"h100": """
gpu_device_info {
  threads_per_block_limit: 1024  threads_per_warp: 32  threads_per_core_limit: 2048
  shared_memory_per_block: 49152  shared_memory_per_block_optin: 232448  shared_memory_per_core: 233472
  core_count: 132  fpus_per_core: 128  registers_per_core_limit: 65536  registers_per_block_limit: 65536
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000  l2_cache_size: 52428800  clock_rate_ghz: 1.98  device_memory_size: 85899345920
  cuda_compute_capability { major: 9 minor: 0 }
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""}
_GPU_NAME = re.compile(r"^(h100)(?:-(\d+))?$")
_SLICES = re.compile(r"^(\d+)x(v\d.*)$")  # 2xv5e-16: two v5e-16 slices, joined by the data-center network

# Cloud TPU accelerator types -> libtpu topologies (v4 and v5p count TensorCores, two per chip; v5e and v6e chips).
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8"}
TOPOLOGIES = {**{f"v5e-{n}": f"v5e:{g}" for n, g in _GRIDS_2D.items()},
              **{f"v6e-{n}": f"v6e:{g}" for n, g in _GRIDS_2D.items()},
              **{f"v4-{2 * n}": f"v4:{g}" for n, g in _GRIDS_3D.items()},
              **{f"v5p-{2 * n}": f"v5p:{g}" for n, g in _GRIDS_3D.items()}}


def topology(name: str) -> tuple[str, list, int]:
  """(topology name, its devices, chips) for a TPU (``v5e-16`` or ``v5e:4x4``) or GPUs of one host (``h100-8``);
  InputError for anything else."""
  gpu = _GPU_NAME.match(name)
  if gpu:
    return _gpu_topology(gpu.group(1), int(gpu.group(2) or 1))
  many = _SLICES.match(name)
  slices, one = (int(many.group(1)), many.group(2)) if many else (1, name)
  topo_name = TOPOLOGIES.get(one, one)
  if ":" not in topo_name or slices < 1:
    raise InputError(f"unknown TPU topology {name!r}; expected an accelerator type ({', '.join(sorted(TOPOLOGIES))}) "
                     f"or a libtpu topology such as v5e:4x4, either after N x for N slices (2xv5e-16), or GPUs such as "
                     f"h100-8")
  # libtpu reads the host's TPU from these and warns when it finds none; this host has none, so say so. A compiled
  # program for devices this process does not have cannot be cached (nor read back) by the persistent cache.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", one if one in TOPOLOGIES else "v5litepod-1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU to own here: plans may compile side by side
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    from jax.experimental import topologies  # noqa: PLC0415
    # v4 and v5p chips hold two TensorCores, which JAX shows as one device ("megacore"), as on a real pod.
    options = {"chip_config_name": "megacore"} if topo_name.split(":")[0] in ("v4", "v5p") else {}
    if slices > 1:
      options["num_slices"] = slices
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo_name, **options)
  except Exception as e:  # libtpu missing, or a topology it refuses (v5e:1x1 is smaller than a host's 2x2)
    import importlib.util  # noqa: PLC0415
    hint = ("ahead-of-time compilation needs libtpu: pip install \"jax[tpu]=={jax.__version__}\""
            if importlib.util.find_spec("libtpu") is None else "libtpu refuses this topology; try a whole host, "
            "such as v5e-4 or v4-8")
    raise InputError(f"cannot compile for TPU topology {topo_name!r} ({_first_line(e)}); {hint}") from None
  chips = slices * math.prod(int(x) for x in topo_name.split(":")[1].split("x"))
  return (f"{slices}x{topo_name}" if slices > 1 else topo_name), list(desc.devices), chips


def _first_line(e: Exception) -> str:
  return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _gpu_topology(model: str, count: int) -> tuple[str, list, int]:
  """``count`` compile-only GPUs of one host (XLA's GPU compiler through the CUDA plugin, no GPU or driver needed)."""
  if count < 1:
    raise InputError(f"{model}-{count}: at least one GPU")
  jax.config.update("jax_enable_compilation_cache", False)
  name = f"1x1x{count}"  # slices x hosts x GPUs per host
  try:
    from jax.experimental import topologies  # noqa: PLC0415
    desc = topologies.get_topology_desc(platform="cuda", target_config=_GPU_TARGETS[model], topology=name)
  except Exception as e:  # no CUDA plugin
    raise InputError(f"cannot compile for {model}-{count} ({_first_line(e)}); ahead-of-time compilation for NVIDIA "
                     f"GPUs needs the CUDA plugin: pip install \"jax[cuda12-local]=={jax.__version__}\"") from None
  return f"{model}:{name}", list(desc.devices), count


# Without a device XLA cannot autotune, and the Triton GEMMs' default tiling failed on float32 "highest" dots
# ("Couldn't find output tile sizes"); cuBLAS calls need no tuning to compile.
_GPU_OPTIONS = {"xla_gpu_enable_triton_gemm": False}

_COLLECTIVE = re.compile(r"= (.*?) (all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} of a compiled program's text: each op's result size per device, counted once where it
  appears (an op inside the gradient-accumulation loop runs once per micro-batch)."""
  out: dict[str, dict[str, int]] = {}
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    arrays = _ARRAY.findall(m.group(1))
    if m.group(3):  # an async start's tuple holds its operands, then the result
      arrays = arrays[-1:]
    size = sum(_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d) for t, dims in arrays)
    entry = out.setdefault(m.group(2), {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += size
  return out


def _with_batch(cfg: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(cfg.to_dict())  # an unlocked copy
  cfg.batch_size = int(batch_size)
  return cfg


def placement(program: program_lib.TrainProgram) -> dict[str, dict[str, float]]:
  """Where the rules table puts the step's arguments: per group (the trained mapper, its optimizer state, the frozen
  models) the GiB in all and on each device, and how many of its arrays are split across devices."""
  state = program.abstract_state()
  out = {}
  for name, tree in (("trained", state.params), ("optimizer", state.opt_state), ("frozen", program.frozen)):
    leaves = jax.tree.leaves(tree)
    out[name] = {
        "gib": sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves) / GiB,
        "gib_per_device": sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves) / GiB,
        "arrays": len(leaves), "split": sum(not x.sharding.is_fully_replicated for x in leaves)}
  return out


def compile_plan(cfg: ml_collections.ConfigDict, devices: list) -> tuple[dict[str, Any], str]:
  """(XLA's figures for the step of ``cfg`` on ``devices``, the compiled program's text)."""
  mesh = sharding.make_mesh(**cfg.mesh, devices=devices)
  start = time.perf_counter()
  program = program_lib.build(cfg, mesh, abstract=True)
  gpu = devices[0].platform != "tpu"
  compiled, stats = program.compile(_GPU_OPTIONS if gpu else None)
  if gpu:  # compile-only GPUs have no cost analysis
    stats["flops"] = None
  stats["estimated_seconds"] = _estimate(compiled)
  stats["compile_seconds"] = time.perf_counter() - start
  stats["mesh"] = dict(mesh.shape)
  stats["batch_shards"] = sharding.batch_shards(mesh)
  stats["placement"] = placement(program)
  return stats, compiled.as_text()


def _out_of_memory(e: Exception) -> bool:
  """Whether XLA refused to compile a program larger than the device (RESOURCE_EXHAUSTED)."""
  return "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e)


def _need(cfg, devices) -> float:
  """Bytes per device of ``cfg``'s step (inf where XLA refuses it as larger than the device)."""
  try:
    stats, _ = compile_plan(cfg, devices)
  except Exception as e:
    if _out_of_memory(e):
      return math.inf
    raise
  return float(stats["bytes_per_device"])


def _line_guess(need: dict[int, float], capacity: int) -> int | None:
  """The largest k that the line through the two largest compiled sizes says fits, or None (fewer than two, or
  memory not growing)."""
  points = sorted((k, b) for k, b in need.items() if math.isfinite(b))
  if len(points) < 2 or points[-1][1] <= points[-2][1]:
    return None
  (k0, b0), (k1, b1) = points[-2:]
  return k1 + math.floor((capacity - b1) * (k1 - k0) / (b1 - b0))


def max_batch(cfg, devices, capacity: int, shards: int, limit: int = 4096,
              known: dict[int, float] | None = None, tried: dict[int, float] | None = None) -> int:
  """The largest batch_size that fits (0: not even the smallest), by compiling, over multiples of the step's
  granularity (data shards x grad_accum, and stage 2's w0 group); ``known``: {batch_size: bytes per device} already
  compiled; ``tried`` receives {batch_size: bytes per device (inf: refused)} of each compile.

  A real-size compile takes 2-35 minutes and memory often grows about linearly with the batch, so each next try is
  where the line through the two largest compiled sizes meets the capacity (held inside what is known; at the largest
  size that fits, the one above it, to confirm), for three tries, then doubling and bisection: 4 compiles where
  memory is linear, where doubling and bisection take 6-8, and the same answer wherever memory grows with the
  batch."""
  unit = shards * int(cfg.grad_accum) * (int(cfg.quirks.w0_max_group) if cfg.stage == 2 else 1)
  top = limit // unit
  need = {b // unit: float(v) for b, v in (known or {}).items() if b % unit == 0 and 0 < b // unit <= top}
  line_tries = 3  # then bisection: the line's guesses are for memory close to linear, not a proof
  while True:
    lo = max([k for k, b in need.items() if b <= capacity], default=0)
    hi = min([k for k, b in need.items() if b > capacity], default=top + 1)
    if hi - lo <= 1:
      return lo * unit
    guess = _line_guess(need, capacity) if line_tries else None
    if lo == 0:
      k = 1
    elif guess is None:
      k = min(2 * lo, top) if hi > top else (lo + hi) // 2
    else:
      k = min(max(guess, lo + 1), hi - 1)  # at or below lo: confirm the size above it
      line_tries -= 1
    need[k] = _need(_with_batch(cfg, k * unit), devices)
    if tried is not None:
      tried[k * unit] = need[k]


@dataclasses.dataclass(frozen=True)
class _Target:
  """The devices of a topology or GPUs named on the command line, and what each holds and computes."""
  topology: str
  accelerator: str
  devices: list
  chips: int
  capacity: int  # HBM bytes per device
  peak_flops: float  # per device

  @property
  def kind(self) -> str:
    return self.devices[0].device_kind

  @property
  def platform(self) -> str:  # "tpu", "gpu" or (tests) "cpu"
    p = self.devices[0].platform
    return p if p in ("tpu", "cpu") else "gpu"

  @property
  def gpu(self) -> bool:
    return self.platform == "gpu"

  def for_target(self, cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unlocked copy of ``cfg`` whose "auto" attention is the target's kernel (TPU: Pallas, by Mosaic)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.attention_impl = attention.resolve(cfg.attention_impl, self.platform)
    return cfg


def _target(name: str) -> _Target:
  topo_name, devices, chips = topology(name)
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise InputError(f"no HBM figure for {kind!r} (known: {', '.join(CHIPS)})")
  chip = CHIPS[kind]
  per_chip = len(devices) // chips  # 1: v4 and v5p are compiled in megacore mode, a device per chip
  many = _SLICES.match(name)
  named = name in TOPOLOGIES or _GPU_NAME.match(name) or (many and many.group(2) in TOPOLOGIES)
  accelerator = name if named else topo_name
  return _Target(topo_name, accelerator, devices, chips, chip.hbm_bytes // per_chip, chip.peak_flops / per_chip)


def _estimate(compiled) -> float | None:
  """XLA's time estimate of a compiled program; none where it gives a negative number (v4 and v5e programs, with or
  without Mosaic kernels) or has no cost analysis (compile-only GPUs)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else (cost or {})
  estimate = float(cost.get("optimal_seconds", 0.0))
  return estimate if estimate > 0 else None


def plan(cfg: ml_collections.ConfigDict, name: str, search: bool = False) -> dict[str, Any]:
  """The report of ``cfg``'s training step on TPU topology or GPUs ``name`` (see the module doc); the largest batch that
  fits is searched when ``search`` or when the configured batch does not fit."""
  target = _target(name)
  topo_name, devices, chips, kind, capacity, peak = (target.topology, target.devices, target.chips, target.kind,
                                                     target.capacity, target.peak_flops)
  cfg = target.for_target(cfg)
  try:
    stats, hlo = compile_plan(cfg, devices)
    compiled = True
  except Exception as e:
    if not _out_of_memory(e):
      raise
    stats, hlo, compiled = {}, "", False
  need = stats.get("bytes_per_device", capacity + 1)
  fits = compiled and need <= capacity
  report: dict[str, Any] = {
      "topology": topo_name, "accelerator": target.accelerator, "device_kind": kind,
      "devices": len(devices), "chips": chips, "stage": int(cfg.stage), "batch_size": int(cfg.batch_size),
      "grad_accum": int(cfg.grad_accum), "compute_dtype": str(cfg.compute_dtype),
      "frozen_dtype": str(cfg.frozen_dtype), "shard_frozen": bool(cfg.shard_frozen), "remat": bool(cfg.remat),
      "resolution": int(cfg.data.resolution), "attention": str(cfg.attention_impl),
      "capacity_gib": capacity / GiB, "fits": bool(fits)}
  if compiled:
    # XLA's cost and time analyses count a loop's body once (tiny stage 1 at grad_accum 1 and 2, the same micro-batch:
    # 6.935e9 and 6.936e9 FLOPs), and the step's accumulation scan runs it grad_accum times; the update outside the
    # loop is then counted grad_accum times too, under 0.1% of a step.
    accum = int(cfg.grad_accum)
    flops = None if stats["flops"] is None else stats["flops"] * accum
    t = None if stats["estimated_seconds"] is None else stats["estimated_seconds"] * accum
    report.update({
        "mesh": stats["mesh"], "gib_per_device": need / GiB,
        **{f"{k}_gib": stats[f"{k}_bytes"] / GiB for k in ("argument", "output", "temp", "alias")},
        "flops_per_device": flops,
        "flops_per_step": flops * len(devices) if flops is not None else None,
        "estimated_step_seconds": t, "samples_per_second": cfg.batch_size / t if t else None,
        "mfu": flops / (t * peak) if t and flops else None, "collectives": collectives(hlo),
        "mosaic_kernels": hlo.count('custom_call_target="tpu_custom_call"'), "placement": stats["placement"],
        "compile_seconds": stats["compile_seconds"]})
  if search or not fits:
    shards = stats.get("batch_shards") or sharding.batch_shards(sharding.make_mesh(**cfg.mesh, devices=devices))
    known = {int(cfg.batch_size): stats.get("bytes_per_device", math.inf)}
    tried: dict[int, float] = {}
    report["max_batch_size"] = max_batch(cfg, devices, capacity, shards, known=known, tried=tried)
    report["max_batch_tries"] = {b: (v / GiB if math.isfinite(v) else None) for b, v in tried.items()}
  return report


def verdict(report: dict[str, Any]) -> str:
  """One line: fits or not, per device, and the largest batch that fits where it was searched."""
  where = f"{report['accelerator']} ({report['devices']} x {report['device_kind']})"
  best = report.get("max_batch_size")
  best_text = "" if best is None else (f"; the largest batch_size that fits is {best}" if best else
                                       "; no batch_size fits (set remat, bfloat16 frozen weights or shard_frozen)")
  if report["fits"]:
    return (f"fits: stage {report['stage']}, batch_size {report['batch_size']} on {where}: "
            f"{report['gib_per_device']:.2f} of {report['capacity_gib']:.2f} GiB per device{best_text}")
  need = f"{report['gib_per_device']:.2f}" if "gib_per_device" in report else "more than"
  return (f"does not fit: stage {report['stage']}, batch_size {report['batch_size']} on {where} needs {need} GiB "
          f"per device of {report['capacity_gib']:.2f}{best_text}")


def describe(report: dict[str, Any]) -> str:
  """The report as lines of text (the verdict last)."""
  if "gib_per_device" not in report:
    return verdict(report)
  r = report
  coll = ", ".join(f"{op} {c['count']}x {c['bytes'] / 2 ** 20:.1f} MiB" for op, c in r["collectives"].items()) or \
      "none"
  mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
  sps = f"{r['samples_per_second']:.1f}" if r["samples_per_second"] else "n/a"
  return "\n".join([
      f"topology {r['topology']}: {r['devices']} devices ({r['device_kind']}, {r['chips']} chips), mesh {r['mesh']}",
      f"stage {r['stage']}, batch {r['batch_size']} (grad_accum {r['grad_accum']}), {r['resolution']} px, compute "
      f"{r['compute_dtype']}, frozen {r['frozen_dtype']}{' sharded' if r['shard_frozen'] else ''}"
      f"{', remat' if r['remat'] else ''}, attention {r['attention']}",
      f"per device: {r['gib_per_device']:.2f} GiB (arguments {r['argument_gib']:.2f}, outputs {r['output_gib']:.2f}, "
      f"temporaries {r['temp_gib']:.2f}, donated {r['alias_gib']:.2f}) of {r['capacity_gib']:.2f}",
      (f"FLOPs per step: {r['flops_per_step']:.3e} ({r['flops_per_device']:.3e} per device)"
       if r["flops_per_step"] is not None else "FLOPs per step: not given by XLA for this target"),
      f"collectives per device: {coll}; Mosaic (Pallas) kernels: {r['mosaic_kernels']}",
      "placement (GiB in all, per device, arrays split): " + ", ".join(
          f"{k} {v['gib']:.2f}, {v['gib_per_device']:.2f}, {v['split']} of {v['arrays']}"
          for k, v in r["placement"].items()),
      (f"XLA's estimate: {1e3 * r['estimated_step_seconds']:.1f} ms per step, {sps} samples/s, MFU {mfu}"
       if r["estimated_step_seconds"] else "XLA's estimate: none given for this program"),
      f"compiled in {r['compile_seconds']:.1f} s",
      *([("max-batch search, GiB per device: " + ", ".join(
          f"{b}: {'refused' if g is None else f'{g:.2f}'}" for b, g in r["max_batch_tries"].items()))]
        if r.get("max_batch_tries") else []),
      verdict(r)])


# ---------------------------------------------------------------------------------------------------------------
# Inference: what ElitePipeline compiles, on one chip
# ---------------------------------------------------------------------------------------------------------------

INFERENCE_PROGRAMS = ("encode", "start", "step", "decode")


def inference_pipeline(cfg: ml_collections.ConfigDict):
  """The abstract ElitePipeline of ``cfg``'s models (shapes, nothing loaded) in its compute dtype and attention:
  the global mapper, and for a stage-2 config the local mapper too."""
  from elite_jax import concept, tiny  # noqa: PLC0415
  from elite_jax.pipeline import ElitePipeline  # noqa: PLC0415
  sd, mapper, _ = program_lib.load_models(cfg, abstract=True)
  kinds = ("global", "local") if cfg.stage == 2 else ("global",)
  return ElitePipeline(sd.configure(remat=False),
                       *[tiny.shapes(concept.mapper_shapes(mapper, kind, sd.unet.config)) for kind in kinds])


def _tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def inference_plans(cfg: ml_collections.ConfigDict, name: str, batches: list[int], steps: int | None = None,
                    ) -> list[dict[str, Any]]:
  """One report per UNet batch size: the programs ``ElitePipeline.programs`` names (encode one concept; start, one
  sampler step, decode a batch) compiled for one device of ``name`` (the pipeline runs on one), at ``cfg``'s
  resolution and the default options (``steps`` sampler steps). Memory: all weights stay on the device, so the peak
  is the weights plus the largest program's other arguments (counted whole), outputs and temporaries."""
  target = _target(name)
  cfg = target.for_target(cfg)
  pipe = inference_pipeline(cfg)
  res = int(cfg.data.resolution)
  opts = pipe.options(height=res, width=res, **({"steps": int(steps)} if steps else {}))
  mesh = jax.sharding.Mesh(np.array(target.devices[:1]), ("device",))
  place = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  weights = _tree_bytes(pipe.params)
  reports, done = [], {}
  for batch in batches:
    programs = pipe.programs(batch, opts)
    stats = {}
    for pname in INFERENCE_PROGRAMS:
      if pname == "encode" and pname in done:  # one concept, whatever the batch
        stats[pname] = done[pname]
        continue
      fn, args = programs[pname]
      start = time.perf_counter()
      args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place), args)
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # the attention kernel is the target's
        lowered = fn.lower(*args)
      try:
        compiled = lowered.compile(_GPU_OPTIONS) if target.gpu else lowered.compile()
      except Exception as e:
        if not _out_of_memory(e):
          raise
        stats[pname] = done.get(pname) if pname == "encode" else None  # XLA refused: larger than the device
        continue
      s = program_lib.compiled_stats(compiled)
      text = compiled.as_text()
      stats[pname] = done[pname] = {
          "gib": s["bytes_per_device"] / GiB,
          **{f"{k}_gib": s[f"{k}_bytes"] / GiB for k in ("argument", "output", "temp", "alias")},
          # What it reads of the weights (jit drops unused arguments: encode reads no UNet), the rest of its
          # arguments being the inputs it is given.
          "weights_gib": max(0, s["argument_bytes"] - _tree_bytes(args[1:])) / GiB,
          "flops": None if target.gpu else s["flops"],
          "estimated_seconds": _estimate(compiled),
          "mosaic_kernels": text.count('custom_call_target="tpu_custom_call"'),
          "compile_seconds": time.perf_counter() - start}
    compiled_all = all(p is not None for p in stats.values())
    peak = weights / GiB + max(p["gib"] - p["weights_gib"] for p in stats.values()) if compiled_all else None
    times = [stats[p]["estimated_seconds"] if stats[p] else None for p in ("start", "step", "decode")]
    batch_seconds = times[0] + opts.steps * times[1] + times[2] if all(times) else None
    reports.append({
        "program": "inference", "topology": target.topology, "accelerator": target.accelerator,
        "device_kind": target.kind, "stage": int(cfg.stage), "batch_size": int(batch), "resolution": res,
        "steps": int(opts.steps), "scheduler": opts.scheduler, "guidance": float(opts.guidance),
        "compute_dtype": pipe.dtype, "attention": str(cfg.attention_impl), "capacity_gib": target.capacity / GiB,
        "weights_gib": weights / GiB, "peak_gib": peak,
        "fits": peak is not None and peak <= target.capacity / GiB,
        "programs": stats, "estimated_batch_seconds": batch_seconds,
        "images_per_second": batch / batch_seconds if batch_seconds else None})
  return reports


def describe_inference(reports: list[dict[str, Any]]) -> str:
  """The inference reports as lines of text, a verdict last."""
  r0 = reports[0]
  mappers = "global and local mappers" if r0["stage"] == 2 else "global mapper"
  lines = [f"inference on one {r0['device_kind']} ({r0['capacity_gib']:.2f} GiB) of {r0['accelerator']}: stage-"
           f"{r0['stage']} models ({mappers}), {r0['compute_dtype']}, attention {r0['attention']}, "
           f"{r0['resolution']} px, {r0['steps']} {r0['scheduler']} steps, guidance {r0['guidance']:g}; "
           f"weights {r0['weights_gib']:.2f} GiB"]
  for r in reports:
    lines.append(f"batch {r['batch_size']}:")
    for pname, p in r["programs"].items():
      if p is None:
        lines.append(f"  {pname:<7}larger than the device (XLA refused to compile it)")
        continue
      flops = f"{p['flops']:.3e} FLOPs" if p["flops"] else "FLOPs n/a"
      est = f"XLA's estimate {1e3 * p['estimated_seconds']:.1f} ms" if p["estimated_seconds"] else "no XLA estimate"
      lines.append(f"  {pname:<7}{p['gib']:.2f} GiB (weights {p['weights_gib']:.2f}, other arguments "
                   f"{p['argument_gib'] - p['weights_gib']:.2f}, outputs {p['output_gib']:.2f}, temporaries "
                   f"{p['temp_gib']:.2f}); {flops}; {est}; Mosaic kernels {p['mosaic_kernels']}; "
                   f"compiled in {p['compile_seconds']:.1f} s")
    est = (f"{r['estimated_batch_seconds']:.2f} s per batch, {r['images_per_second']:.2f} images/s"
           if r["estimated_batch_seconds"] else "none")
    peak = "over" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    lines.append(f"  peak {peak} of {r['capacity_gib']:.2f} GiB; XLA's estimate of start + "
                 f"{r['steps']} steps + decode: {est}")
  lines.append(inference_verdict(reports))
  return "\n".join(lines)


def inference_verdict(reports: list[dict[str, Any]]) -> str:
  """One line: the largest batch size tried that fits one device, or that none does."""
  r0 = reports[0]
  where = f"one {r0['device_kind']} of {r0['accelerator']}"
  fit = [r for r in reports if r["fits"]]
  if len(fit) == len(reports):
    best = max(fit, key=lambda r: r["batch_size"])
    return (f"fits: inference at batch {', '.join(str(r['batch_size']) for r in reports)} on {where}: "
            f"{best['peak_gib']:.2f} of {best['capacity_gib']:.2f} GiB at batch {best['batch_size']}")
  worst = min((r for r in reports if not r["fits"]), key=lambda r: r["batch_size"])
  best = (f"; batch {max(r['batch_size'] for r in fit)} fits" if fit else
          "; no batch tried fits (try --config.compute_dtype=bfloat16)")
  cap = worst["capacity_gib"]
  need = f"more than its {cap:.2f}" if worst["peak_gib"] is None else f"{worst['peak_gib']:.2f} GiB of {cap:.2f}"
  return f"does not fit: inference at batch {worst['batch_size']} on {where} needs {need} GiB{best}"
