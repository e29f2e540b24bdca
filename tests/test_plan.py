"""Ahead-of-time plans for TPU topologies (train/plan.py): the training step compiled by libtpu on this CPU host."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from elite_jax import sharding
from elite_jax.errors import InputError
from elite_jax.train import plan, program
from tests import tiny_models

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str, **over):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return tiny_models.override(module.get_config(), **over)


def _need_libtpu():
  if importlib.util.find_spec("libtpu") is None:
    if os.environ.get("CI"):
      pytest.fail("libtpu is not installed (.ci/run installs the test extra, which has jax[tpu])")
    pytest.skip("libtpu is not installed: pip install \"jax[tpu]\"")


def _cuda_plugin_path() -> str:
  """Where the CUDA plugin is for the H100 plan's command: ``$ELITE_JAX_TEST_CUDA_PLUGIN``, a folder of its own
  (``pip install --no-deps --target DIR jax-cuda12-plugin==V jax-cuda12-pjrt==V``, as .ci/run does); in the test
  environment itself every JAX process would log its missing drivers."""
  path = os.environ.get("ELITE_JAX_TEST_CUDA_PLUGIN", "")
  if not os.path.isdir(os.path.join(path, "jax_plugins", "xla_cuda12")):
    if os.environ.get("CI"):
      pytest.fail(f"no CUDA plugin at ELITE_JAX_TEST_CUDA_PLUGIN={path!r} (.ci/run installs it)")
    pytest.skip("set ELITE_JAX_TEST_CUDA_PLUGIN to a folder holding jax-cuda12-plugin and jax-cuda12-pjrt")
  return path


def test_the_plan_compiles_the_training_programs_step():
  """What the plan compiles is the step training runs: the same builder, and with abstract=True the same program
  text as the step of the loaded models (lowered on this host's CPU mesh)."""
  cfg = load_config("tiny_stage1", batch_size=4)
  mesh = sharding.make_mesh(data=2, devices=jax.devices()[:2])
  real, abstract = program.build(cfg, mesh), program.build(cfg, mesh, abstract=True)
  # The CPU kernel's custom calls name their partitioning callback by a Python object id, which differs per trace.
  text = lambda p: re.sub(r'"\d{6,}"', '"id"', p.step.lower(p.abstract_state(), p.frozen,  # noqa: E731
                                                             p.abstract_batch()).as_text())
  assert text(real) == text(abstract)


def test_the_placement_is_what_the_devices_hold():
  """The plan's placement (GiB per group in all and per device, arrays split) of the abstract program is what the
  placed arrays of the real one hold on a device: replicated with a data mesh, split by the rules table with fsdp."""
  devices = jax.devices()[:2]
  for mesh_axes, shard_frozen in (({"data": 2}, False), ({"data": 1, "fsdp": 2}, True)):
    cfg = load_config("tiny_stage1", batch_size=4, shard_frozen=shard_frozen)
    mesh = sharding.make_mesh(**mesh_axes, devices=devices)
    got = plan.placement(program.build(cfg, mesh, abstract=True))
    real = program.build(cfg, mesh)
    state = real.init_state()
    for name, tree in (("trained", state.params), ("optimizer", state.opt_state), ("frozen", real.frozen)):
      leaves = jax.tree.leaves(tree)
      on_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
      assert got[name]["gib_per_device"] == pytest.approx(on_device / 2 ** 30), (mesh_axes, name)
      assert got[name]["gib"] == pytest.approx(sum(x.nbytes for x in leaves) / 2 ** 30), (mesh_axes, name)
      split = sum(x.addressable_shards[0].data.shape != x.shape for x in leaves)
      assert (got[name]["split"], got[name]["arrays"]) == (split, len(leaves)), (mesh_axes, name)
      if "fsdp" in mesh_axes:
        assert split > 0 and got[name]["gib_per_device"] < got[name]["gib"], name
      else:
        assert split == 0 and got[name]["gib_per_device"] == got[name]["gib"], name


@pytest.mark.full
def test_the_command_reports_a_tiny_step_on_v5e_2x2(tmp_path):
  """Through the command users type: the tiny stage-1 step at 128 px on a 2x2 v5e slice, with the Pallas kernel
  (Mosaic, not interpreted) for its 256-token attention."""
  _need_libtpu()
  out = tmp_path / "plan.jsonl"
  proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_stage1.py"),
                         "--config.batch_size=8", "--config.data.resolution=128", "--aot", "v5e:2x2",
                         "--aot_json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[-1].startswith("fits: stage 1, batch_size 8 on v5e:2x2 (4 x TPU v5 lite): ")
  report = json.loads(out.read_text())
  assert (report["devices"], report["chips"], report["device_kind"]) == (4, 4, "TPU v5 lite")
  assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert report["attention"] == "pallas" and report["mosaic_kernels"] > 0
  assert report["fits"] and report["capacity_gib"] == 16.0
  assert 0 < report["gib_per_device"] < 1
  parts = sum(report[f"{k}_gib"] for k in ("argument", "output", "temp")) - report["alias_gib"]
  assert abs(parts - report["gib_per_device"]) < 1e-9
  assert report["flops_per_step"] == pytest.approx(4 * report["flops_per_device"])
  assert report["flops_per_device"] > 1e9  # the UNet's forward and backward pass over 2 samples of 16 x 16 latents
  assert report["estimated_step_seconds"] > 0 and 0 < report["mfu"] < 1
  assert report["collectives"]["all-reduce"]["bytes"] > 0  # the data-parallel gradient reduction
  placed = report["placement"]  # a data mesh: every argument replicated, the frozen models most of them
  assert all(p["split"] == 0 and p["gib_per_device"] == p["gib"] for p in placed.values())
  assert placed["frozen"]["gib"] > placed["trained"]["gib"] > 0
  assert report["argument_gib"] >= sum(p["gib_per_device"] for p in placed.values())
  assert any(line.startswith("placement (GiB in all, per device, arrays split): trained ") for line in lines)


@pytest.mark.full
def test_bf16_pallas_attention_compiles_for_a_tpu_under_the_steps_precision():
  """The training step traces under matmul precision "highest", which Mosaic refuses on bf16 operands ("Bad lhs
  type"); the Pallas attention's forward and backward kernels still compile for a v5e chip in bf16 and float32."""
  _need_libtpu()
  from elite_jax.models import attention

  _, devices, _ = plan.topology("v5e:2x2")
  mesh = sharding.make_mesh(data=4, devices=devices)

  def loss(q, k, v):
    out = attention.dot_product_attention(q, k, v, implementation="pallas")
    return out.astype(jnp.float32).sum()

  for dtype in (jnp.bfloat16, jnp.float32):
    args = [jax.ShapeDtypeStruct((4, 256, 2, 64), dtype, sharding=NamedSharding(mesh, P(sharding.BATCH)))] * 3
    with jax.default_matmul_precision("highest"), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') >= 2, dtype  # forward and backward


@pytest.mark.full
def test_two_slices_data_parallel_across_them(tmp_path):
  """N x TOPOLOGY is N slices joined by the data-center network: the mesh puts the data axis across slices and fsdp
  within each; the command compiles the tiny step for two v5e:2x2 slices."""
  _need_libtpu()
  name, devices, chips = plan.topology("2xv5e:2x2")
  assert (name, len(devices), chips) == ("2xv5e:2x2", 8, 8)
  mesh = sharding.make_mesh(data=2, fsdp=4, devices=devices)
  assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]
  with pytest.raises(InputError, match="data must be a multiple of 2"):
    sharding.make_mesh(data=1, fsdp=8, devices=devices)
  out = tmp_path / "plan.jsonl"
  proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_stage1.py"),
                         "--config.batch_size=8", "--config.data.resolution=128", "--aot", "2xv5e:2x2",
                         "--aot_json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1].startswith("fits: stage 1, batch_size 8 on 2xv5e:2x2 (8 x TPU v5 lite)")
  report = json.loads(out.read_text())
  assert (report["devices"], report["chips"], report["mesh"]["data"]) == (8, 8, 8)
  assert report["collectives"]["all-reduce"]["bytes"] > 0


@pytest.mark.full
def test_the_command_reports_a_tiny_step_on_two_h100s_without_a_gpu(tmp_path):
  """The same command for 2 NVIDIA H100s of one host, compiled by XLA's GPU compiler through the CUDA plugin on this
  machine, which has no GPU and no driver (compile-only devices from the plan's H100 target description)."""
  plugin = _cuda_plugin_path()
  out = tmp_path / "plan.jsonl"
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # the command itself keeps JAX on the CPU
  env["PYTHONPATH"] = os.pathsep.join([plugin, str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_stage1.py"),
                         "--config.batch_size=8", "--config.data.resolution=128", "--aot", "h100-2",
                         "--aot_json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=900, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1].startswith(
      "fits: stage 1, batch_size 8 on h100-2 (2 x NVIDIA H100 80GB HBM3): ")
  report = json.loads(out.read_text())
  assert (report["devices"], report["device_kind"], report["topology"]) == (2, "NVIDIA H100 80GB HBM3", "h100:1x1x2")
  assert report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1} and report["attention"] == "xla"
  assert report["fits"] and report["capacity_gib"] == 80.0 and 0 < report["gib_per_device"] < 1
  assert report["flops_per_step"] is None and report["estimated_step_seconds"] is None  # XLA gives none here
  assert report["collectives"]["all-reduce"]["bytes"] > 0


@pytest.mark.full
def test_the_command_reports_tiny_inference_on_one_v5e_chip(tmp_path):
  """``--aot_inference``: the tiny stage-2 pipeline's programs at 128 px for one chip of a v5e:2x2 slice, a report
  per batch size, with the Pallas kernel in the UNet step."""
  _need_libtpu()
  out = tmp_path / "plan.jsonl"
  proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_stage2.py"),
                         "--config.data.resolution=128", "--aot", "v5e:2x2", "--aot_inference", "1,2",
                         "--aot_json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1].startswith(
      "fits: inference at batch 1, 2 on one TPU v5 lite of v5e:2x2: ")
  reports = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["batch_size"] for r in reports] == [1, 2]
  for r in reports:
    assert (r["program"], r["stage"], r["attention"], r["resolution"], r["steps"]) == ("inference", 2, "pallas",
                                                                                       128, 100)
    assert r["fits"] and 0 < r["peak_gib"] < 1 and r["capacity_gib"] == 16.0
    assert sorted(r["programs"]) == sorted(plan.INFERENCE_PROGRAMS)
    assert r["programs"]["step"]["mosaic_kernels"] > 0 and r["programs"]["step"]["flops"] > 1e8
  assert reports[1]["programs"]["step"]["flops"] == pytest.approx(2 * reports[0]["programs"]["step"]["flops"],
                                                                  rel=0.05)


def test_unknown_topology_is_one_line():
  proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_stage1.py"),
                         "--aot", "v9-8"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown TPU topology 'v9-8'")
  proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny_stage2.py"),
                         "--aot", "v5e-1", "--aot_inference", "1,eight"], capture_output=True, text=True, cwd=REPO,
                        timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == "error: --aot_inference takes batch sizes such as 1,8, got 1,eight"


def test_max_batch_search_and_the_verdict(monkeypatch):
  """The search compiles at multiples of the step's granularity, finds the largest batch that fits for any memory that
  grows with the batch (linear, concave, convex, refused by XLA beyond a size), in 4 compiles where memory is linear;
  a batch that does not fit gets one line naming the largest that does."""
  tried = []
  model = {}

  def need(cfg, devices):
    tried.append(cfg.batch_size)
    return model["f"](cfg.batch_size)

  monkeypatch.setattr(plan, "_need", need)
  cfg = load_config("tiny_stage1", grad_accum=2)  # unit: 4 data shards x 2 accumulation steps = 8
  cases = {"linear": lambda b: 5.0 + 0.3 * b, "concave": lambda b: 5.0 + 3 * math.sqrt(b),
           "convex": lambda b: 5.0 + 0.002 * b * b, "steps": lambda b: 5.0 + 4 * (b // 64),
           "refused": lambda b: math.inf if b > 200 else 1.0 + 0.01 * b, "fixed": lambda b: 7.0,
           "none": lambda b: 17.0}
  for name, f in cases.items():
    model["f"] = f
    for capacity in (8, 16, 200):
      tried.clear()
      best = max([b for b in range(8, 4097, 8) if f(b) <= capacity], default=0)
      assert plan.max_batch(cfg, [], capacity, shards=4) == best, (name, capacity, tried)
      assert all(b % 8 == 0 for b in tried) and len(tried) == len(set(tried)), (name, tried)
      assert len(tried) <= 18, (name, capacity, tried)  # doubling then bisection over 512 sizes: up to 18
  model["f"] = cases["linear"]
  tried.clear()
  assert plan.max_batch(cfg, [], 16, shards=4) == 32
  assert len(tried) == 4, tried  # 8, 16, then the line's 32 and 40 to confirm
  log = {}
  plan.max_batch(cfg, [], 16, shards=4, tried=log)
  assert log == {b: cases["linear"](b) for b in (8, 16, 32, 40)}
  tried.clear()
  assert plan.max_batch(cfg, [], 16, shards=4, known={16: cases["linear"](16)}) == 32 and 16 not in tried
  assert plan.max_batch(cfg, [], 1, shards=64) == 0
  line = plan.verdict({"accelerator": "v5e-16", "devices": 16, "device_kind": "TPU v5 lite", "fits": False,
                       "stage": 1, "batch_size": 64, "gib_per_device": 20.5, "capacity_gib": 16.0,
                       "max_batch_size": 32})
  assert line == ("does not fit: stage 1, batch_size 64 on v5e-16 (16 x TPU v5 lite) needs 20.50 GiB per device "
                  "of 16.00; the largest batch_size that fits is 32")
  assert "\n" not in line


def test_flops_and_estimate_count_every_accumulation_step(monkeypatch):
  """XLA's analyses count the accumulation scan's body once; the report counts it grad_accum times."""
  devices = jax.devices("cpu")[:2]
  monkeypatch.setattr(plan, "_target", lambda name: plan._Target("cpu:2", name, devices, 2, 2 ** 30, 1e12))
  stats = {"flops": 3e9, "estimated_seconds": 0.01, "bytes_per_device": 2 ** 20, "argument_bytes": 2 ** 20,
           "output_bytes": 0, "temp_bytes": 0, "alias_bytes": 0, "compile_seconds": 1.0,
           "mesh": {"data": 2, "fsdp": 1, "tensor": 1}, "batch_shards": 2, "placement": {}}
  monkeypatch.setattr(plan, "compile_plan", lambda cfg, devices: (dict(stats), ""))
  r = plan.plan(load_config("tiny_stage1", batch_size=16, grad_accum=4), "cpu-2")
  assert r["flops_per_device"] == 4 * 3e9 and r["flops_per_step"] == 2 * 4 * 3e9
  assert r["estimated_step_seconds"] == pytest.approx(0.04) and r["samples_per_second"] == pytest.approx(16 / 0.04)
  assert r["mfu"] == pytest.approx(4 * 3e9 / (0.04 * 1e12))
  # With the search: each compile's GiB in the report and in one line of its text (16 known; 40 refused by XLA).
  monkeypatch.setattr(plan, "_need", lambda cfg, devices: 2 ** 25 * cfg.batch_size if cfg.batch_size < 40 else
                      math.inf)
  r = plan.plan(load_config("tiny_stage1", batch_size=16, grad_accum=4), "cpu-2", search=True)
  assert r["max_batch_size"] == 32 and r["max_batch_tries"] == {32: 1.0, 40: None}
  assert "max-batch search, GiB per device: 32: 1.00, 40: refused" in plan.describe(r).splitlines()


@pytest.mark.full
def test_v4_and_v5p_are_a_device_per_chip():
  """As on a real v4 or v5p pod (megacore): 4 devices for v4-8, each a chip, on which the project's mesh is built
  (libtpu's default, a device per TensorCore, fails jax.make_mesh). In a subprocess: the plan sets libtpu's
  environment and turns the compilation cache off."""
  code = ("from elite_jax import sharding; from elite_jax.train import plan\n"
          "for name in ('v4-8', 'v5p-8'):\n"
          "  topo, devices, chips = plan.topology(name)\n"
          "  mesh = sharding.make_mesh(data=-1, fsdp=1, tensor=1, devices=devices)\n"
          "  print(name, topo, len(devices), chips, dict(mesh.shape)['data'], devices[0].device_kind)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("v")]
  assert lines == ["v4-8 v4:2x2x1 4 4 4 TPU v4", "v5p-8 v5p:2x2x1 4 4 4 TPU v5"]


def test_topology_names():
  assert plan.TOPOLOGIES["v5e-16"] == "v5e:4x4" and plan.TOPOLOGIES["v5e-256"] == "v5e:16x16"
  assert plan.TOPOLOGIES["v4-8"] == "v4:2x2x1" and plan.TOPOLOGIES["v5p-8"] == "v5p:2x2x1"
  assert plan._GPU_NAME.match("h100-8").groups() == ("h100", "8") and not plan._GPU_NAME.match("h100-")
  assert plan._SLICES.match("2xv5e-16").groups() == ("2", "v5e-16") and not plan._SLICES.match("v5e:2x2")
  for bad in ("v5e16", "2xv5e16", "0xv5e-16"):
    with pytest.raises(InputError, match=f"unknown TPU topology '{bad}'"):
      plan.topology(bad)


def _shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree), jax.tree.structure(tree)


def test_the_inference_programs_are_what_generate_runs():
  """``ElitePipeline.programs`` names the functions and argument shapes that ``encode_concept`` and ``generate``
  call (seen by wrapping the pipeline's jitted functions), at a batch of 2 images with the local mapper."""
  from elite_jax.pipeline import ElitePipeline  # noqa: PLC0415
  pipe = ElitePipeline.from_random("tiny")
  opts = pipe.options(height=64, width=64, steps=2)
  programs = pipe.programs(2, opts)
  assert list(programs) == list(plan.INFERENCE_PROGRAMS)
  called = {}

  def spy(name, fn):
    def call(*args):
      called.setdefault(name, _shapes(args))
      return fn(*args)
    return call

  denoise = [k for k in pipe._compiled if k != "encode"]
  assert len(denoise) == 1  # programs() made one sampling loop's functions, which generate must find and use
  pipe._compiled["encode"] = spy("encode", pipe._compiled["encode"])
  pipe._compiled[denoise[0]] = tuple(spy(n, f) for n, f in zip(("start", "step", "decode"),
                                                                pipe._compiled[denoise[0]]))
  image = np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
  concept = pipe.encode_concept(image)
  pipe.generate(concept, ["a photo of a S", "a S on the beach"], opts, progress=False)
  assert sorted(called) == sorted(programs)
  for name, (_, args) in programs.items():
    assert called[name] == _shapes(args), name


def test_the_inference_report_on_this_cpu(monkeypatch):
  """The report's arithmetic on programs compiled for this host's CPU (the target patched in): the peak is the
  weights plus the largest program's other bytes; the estimate adds start, the steps and decode."""
  devices = jax.devices("cpu")[:1]
  monkeypatch.setattr(plan, "_target", lambda name: plan._Target("cpu:1", name, devices, 1, 2 ** 30, 1e12))
  cfg = load_config("tiny_stage2", **{"data.resolution": 64})
  reports = plan.inference_plans(cfg, "cpu-1", [1, 2], steps=3)
  pipe = plan.inference_pipeline(cfg)
  unet_gib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pipe.params["unet"])) / 2 ** 30
  assert [r["batch_size"] for r in reports] == [1, 2]
  for r in reports:
    progs = r["programs"]
    assert list(progs) == list(plan.INFERENCE_PROGRAMS) and r["steps"] == 3 and r["stage"] == 2
    assert progs["step"]["weights_gib"] == pytest.approx(unet_gib, rel=1e-3)  # the step reads the UNet's weights
    assert 0 < progs["decode"]["weights_gib"] < progs["step"]["weights_gib"]
    assert r["peak_gib"] == pytest.approx(r["weights_gib"] + max(p["gib"] - p["weights_gib"]
                                                                 for p in progs.values()))
    assert all(p["flops"] > 0 for p in progs.values())
    assert r["fits"] == (r["peak_gib"] <= 1.0)
  assert reports[1]["programs"]["step"]["flops"] > 1.5 * reports[0]["programs"]["step"]["flops"]
  assert reports[1]["programs"]["encode"] is reports[0]["programs"]["encode"]  # one concept, compiled once
  with pytest.raises(InputError, match="this pipeline holds shapes, not weights"):
    pipe.encode_concept(np.zeros((64, 64, 3), np.uint8))
  text = plan.describe_inference(reports)
  assert text.splitlines()[-1].startswith("fits: inference at batch 1, 2 on one cpu of cpu-1: ")
  too_big = [dict(reports[0], fits=True), dict(reports[1], fits=False, peak_gib=3.0)]
  assert plan.inference_verdict(too_big) == ("does not fit: inference at batch 2 on one cpu of cpu-1 needs 3.00 GiB "
                                             "of 1.00 GiB; batch 1 fits")
  refused = dict(reports[0], fits=False, peak_gib=None, programs=dict(reports[0]["programs"], step=None))
  assert plan.describe_inference([refused]).splitlines()[-1] == (
      "does not fit: inference at batch 1 on one cpu of cpu-1 needs more than its 1.00 GiB; no batch tried fits "
      "(try --config.compute_dtype=bfloat16)")
