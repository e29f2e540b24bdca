"""The extra cost per denoising step of a ControlNet and of an IP-Adapter beside ELITE, elite-jax against PyTorch.

Both sides get the same random weights and inputs. One step = the classifier-free-guidance batch (2 x images) with
ELITE's local branch on (256 local tokens, lambda 0.8); "+ ControlNet" adds the ControlNet on the same batch and its
residuals, "+ IP-Adapter" the decoupled image-prompt term (4 tokens) in every cross-attention. PyTorch is the tests'
restatement (tests/elite_reference.py: diffusers' UNet with the ELITE processor, diffusers' ControlNetModel). Times
are medians after warm-up in one process, so the ratios compare like with like.

  python bench/bench_compose.py                  # CPU: the small SD-layout UNet of bench_inference.py, 256 px
  python bench/bench_compose.py --shape sd14 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from bench.bench_inference import SMALL_UNET
from bench.timing import jax_sync, torch_sync
from elite_jax import concept
from elite_jax.models import presets
from elite_jax.models.elite_attention import IPInputs, LocalInputs
from elite_jax.weights import pretrained
from elite_jax.weights.ip_adapter_files import load_ip_adapter
from elite_jax.weights.mapper_files import load_mapper
from tests import elite_reference as ref
from tests import tiny_models


VARIANTS = (("elite", False, False), ("controlnet", True, False), ("ip", False, True), ("both", True, True))


def round_robin(fns: dict, reps: int, sync) -> dict:
  """Median seconds per call of each function, timed in turns (one call of each per round, after two warm-up
  rounds), so that a load that drifts during the run (this CPU is shared) weighs on every variant alike."""
  times = {k: [] for k in fns}
  for r in range(reps + 2):
    for k, f in fns.items():
      t0 = time.perf_counter()
      sync(f())
      if r >= 2:
        times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def bench(unet_cfg: dict, images: int, reps: int, folder: Path) -> dict:
  torch.manual_seed(0)
  tunet = tiny_models.randomize(UNet2DConditionModel(**unet_cfg), 0, 0.01)
  tcn = tiny_models.randomize(ControlNetModel.from_unet(tunet), 1, 0.01)
  tunet.save_pretrained(folder / "unet")
  tcn.save_pretrained(folder / "controlnet")
  width = unet_cfg["cross_attention_dim"]
  gstate = tiny_models.mapper_state_for(tunet, input_dim=16, output_dim=width, hidden=16, context_dim=width)
  lstate = tiny_models.mapper_state_for(tunet, input_dim=16, output_dim=width, hidden=16, context_dim=width, seed=1)
  ip_state = tiny_models.ip_adapter_state(tunet, embed_dim=16, seed=2, scale=0.01)
  torch.save(ip_state, folder / "ip.bin")

  unet, host = pretrained.load_unet(folder / "unet")
  cn, cn_params = pretrained.load_controlnet(folder / "controlnet")
  torch.save(gstate, folder / "g.pt")
  torch.save(lstate, folder / "l.pt")
  kv = [load_mapper(folder / f"{k}.pt", unet.config, kind).kv for k, kind in (("g", "global"), ("l", "local"))]
  _, ip_kv = load_ip_adapter(folder / "ip.bin", unet.config)
  params = jax.device_put(concept.merge_kv(host, *kv))
  params_ip = jax.device_put(concept.merge_kv(host, *kv, ip_kv))
  cn_params = jax.device_put(cn_params)

  b, side = 2 * images, unet_cfg["sample_size"]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, side, side, 4)).astype(np.float32)
  ctx = rng.standard_normal((b, 77, width)).astype(np.float32)
  feats = rng.standard_normal((images, 256, width)).astype(np.float32)
  img = rng.uniform(size=(b, 8 * side, 8 * side, 3)).astype(np.float32)
  tokens = rng.standard_normal((b, 4, width)).astype(np.float32)
  t = np.full((b,), 500.0, np.float32)
  local = LocalInputs(jnp.asarray(feats), jnp.full((images,), 5, jnp.int32), jnp.full((images,), 0.8), max_group=1)
  ip = IPInputs(jnp.asarray(tokens), jnp.float32(0.6))

  def step(p, cp, x, c, img, ip, control: bool, use_ip: bool):
    res = cn.apply({"params": cp}, x, t, c, img, 1.0) if control else None
    return unet.apply({"params": p}, x, t, c, local, res, ip if use_ip else None)
  xj, cj, ij = jnp.asarray(x), jnp.asarray(ctx), jnp.asarray(img)
  jax_fns = {}
  for name, control, use_ip in VARIANTS:
    f = jax.jit(lambda p, cp, x, c, i, q, control=control, use_ip=use_ip: step(p, cp, x, c, i, q, control, use_ip))
    p = params_ip if use_ip else params
    jax_fns[name] = lambda f=f, p=p: f(p, cn_params, xj, cj, ij, ip)
  out = {f"jax_{k}_s": v for k, v in round_robin(jax_fns, reps, jax_sync).items()}

  ref.install_elite(tunet, gstate, lstate, ip_state=ip_state["ip_adapter"])
  xt, ct = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ctx)
  it, tt = torch.from_numpy(img.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t)
  ft, qt = torch.from_numpy(np.concatenate([feats] * 2)), torch.from_numpy(tokens)
  index = torch.full((b,), 5)

  def torch_step(control: bool, use_ip: bool):
    kw = {"local": ft, "index": index, "lam": 0.8}
    if use_ip:
      kw.update(ip=qt, ip_scale=0.6)
    res = {}
    if control:
      d, m = tcn(xt, tt, ct, controlnet_cond=it, conditioning_scale=1.0, return_dict=False)
      res = {"down_block_additional_residuals": d, "mid_block_additional_residual": m}
    return tunet(xt, tt, ct, cross_attention_kwargs=kw, **res).sample
  with torch.no_grad():
    fns = {name: (lambda c=control, u=use_ip: torch_step(c, u)) for name, control, use_ip in VARIANTS}
    out.update({f"torch_{k}_s": v for k, v in round_robin(fns, reps, torch_sync).items()})
  for side_ in ("jax", "torch"):
    for name in ("controlnet", "ip", "both"):
      out[f"{side_}_{name}_extra"] = out[f"{side_}_{name}_s"] / out[f"{side_}_elite_s"] - 1
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", choices=("small", "sd14"), default="small")
  p.add_argument("--images", type=int, default=1)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--output", default="bench/results_cpu.jsonl")
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  # XLA:CPU flushes denormals; without the same, tiny random weights make PyTorch's CPU kernels crawl (measured 100x).
  torch.set_flush_denormal(True)
  cfg = SMALL_UNET if args.shape == "small" else presets.SD14_UNET
  with tempfile.TemporaryDirectory() as d:
    res = bench(dict(cfg), args.images, args.reps, Path(d))
  record = {"bench": "compose", "shape": args.shape, "images": args.images, "backend": jax.default_backend(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **res}
  print(json.dumps(record, indent=1))
  with open(args.output, "a") as f:
    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  main()
