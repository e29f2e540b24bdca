"""Train-step throughput and model FLOPs utilisation, elite-jax against a PyTorch reference step, per stage.

The PyTorch step is the official recipe restated (tests/elite_reference.py): diffusers' UNet with the ELITE
cross-attention processor, transformers' CLIP towers, the same mapper, VAE encode, loss, backward, clip, AdamW. Both
sides use the same model shapes and batch; times are medians after warm-up, in one process.

  python bench/bench_train.py --shape small --batch 2          # CPU
  python bench/bench_train.py --shape sd14 --batch 4 8 --gpu   # GPU: SD v1-4 at 512 px; JAX fp32 and bf16 compute,
                                                               # PyTorch fp32 (official) and fp16 autocast

MFU = XLA's cost-analysis FLOPs of the compiled step / step time / the chip's peak (GPU: the datasheet dense rate of
the compute dtype; CPU: this machine's measured float32 matmul rate, stated as such).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import AutoencoderKL as TorchVAE, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from bench.timing import jax_sync, median_time, torch_sync
from elite_jax import native, sharding
from elite_jax.models import presets
from elite_jax.train import config as config_lib
from elite_jax.train.program import build
from tests import elite_reference as ref
from tests import tiny_models

SHAPES = {
    "small": dict(unet=dict(presets.SD14_UNET, block_out_channels=[64, 128, 256, 256], sample_size=32),
                  vae=dict(presets.SD14_VAE, block_out_channels=[32, 64, 64, 64]),
                  text=dict(presets.CLIP_L14_TEXT, num_hidden_layers=4),
                  vision=dict(presets.CLIP_L14_VISION, hidden_size=256, intermediate_size=1024, num_attention_heads=4),
                  resolution=256, hidden=256),
    "sd14": dict(unet=presets.SD14_UNET, vae=presets.SD14_VAE, text=presets.CLIP_L14_TEXT,
                 vision=presets.CLIP_L14_VISION, resolution=512, hidden=1024),
}
PEAK_GPU = {"float32": 67e12, "bfloat16": 989e12}  # H100/H200 SXM dense datasheet rates


def torch_models(shape, device):
  torch.manual_seed(0)
  unet = UNet2DConditionModel(**shape["unet"]).to(device).eval()
  vae = TorchVAE(**shape["vae"]).to(device).eval()
  text = CLIPTextModel(CLIPTextConfig(**shape["text"])).to(device).eval()
  vision = CLIPVisionModel(CLIPVisionConfig(**shape["vision"])).to(device).eval()
  for m in (unet, vae, text, vision):
    m.requires_grad_(False)
  return unet, vae, text, vision


def write_checkpoints(shape, tms, folder: Path) -> Path:
  """The PyTorch models as a diffusers SD folder and a CLIP folder, and a random stage-1 mapper in the official
  layout: the JAX side loads them through the library's own loaders."""
  unet, vae, text, vision = tms
  tiny_models.write_sd_folder(folder / "sd", models={"unet": unet, "vae": vae, "text_encoder": text})
  vision.save_pretrained(folder / "clip")
  width = shape["text"]["hidden_size"]
  torch.save(tiny_models.mapper_state_for(unet, input_dim=shape["vision"]["hidden_size"], output_dim=width,
                                          hidden=shape["hidden"], context_dim=width), folder / "global_mapper.pt")
  return folder


def jax_setup(shape, folder: Path, stage, batch, compute):
  cfg = config_lib.defaults()
  cfg.stage, cfg.batch_size, cfg.grad_accum, cfg.compute_dtype = stage, batch, 1, compute
  cfg.pretrained, cfg.image_encoder = str(folder / "sd"), str(folder / "clip")
  cfg.global_mapper = str(folder / "global_mapper.pt") if stage == 2 else ""
  cfg.mapper.hidden_dim = shape["hidden"]
  cfg.data.resolution = shape["resolution"]
  cfg.reg_weight = 0.01 if stage == 1 else 1e-4
  cfg.frozen_dtype = compute
  program = build(cfg, sharding.make_mesh(devices=jax.devices()[:1]))
  return program.step, program.init_state(), program.frozen, program.global_batch(make_batch(stage, batch, shape))


def make_batch(stage, b, shape):
  rng = np.random.default_rng(0)
  r = shape["resolution"]
  ids = np.full((b, 77), 49407, np.int32)
  ids[:, :6] = [49406, 320, 1125, 539, 320, 338]
  out = {"pixel_values": rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32),
         "pixel_values_clip": rng.standard_normal((b, 224, 224, 3)).astype(np.float32),
         "input_ids": ids, "index": np.full((b,), 5, np.int32)}
  if stage == 2:
    out.update(pixel_values_obj=rng.standard_normal((b, 224, 224, 3)).astype(np.float32),
               token_mask=(rng.uniform(size=(b, 256)) > 0.5).astype(np.float32),
               mask_values=np.ones((b, r // 8, r // 8, 1), np.float32))
  return out


def torch_step_fn(stage, tms, shape, batch, device, autocast):
  """The official step: mapper (+local mapper), injection, UNet with ELITE attention, loss, backward, clip, AdamW."""
  unet, vae, text, vision = tms
  unet.requires_grad_(False)  # the previous stage's run may have left K/V trainable
  hidden, din, dout = shape["hidden"], shape["vision"]["hidden_size"], shape["text"]["hidden_size"]
  mapper = ref.Mapper(din, dout, hidden).to(device).train()
  gmapper = ref.Mapper(din, dout, hidden).to(device).eval().requires_grad_(False) if stage == 2 else None
  procs, kv = {}, []
  for name, module in unet.named_modules():
    if hasattr(module, "set_processor") and hasattr(module, "to_q"):
      kl = vl = None
      if name.endswith("attn2"):
        if stage == 1:
          module.to_k.requires_grad_(True)
          module.to_v.requires_grad_(True)
          kv += [module.to_k.weight, module.to_v.weight]
        else:
          kl = torch.nn.Linear(module.to_k.in_features, module.to_k.out_features, bias=False).to(device)
          vl = torch.nn.Linear(module.to_v.in_features, module.to_v.out_features, bias=False).to(device)
          kv += [kl.weight, vl.weight]
      procs[f"{name}.processor"] = _Recording(kl, vl)
  unet.set_attn_processor(procs)
  params = list(mapper.parameters()) + kv
  opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
  sched = DDPMScheduler.from_config(presets.SD14_SCHEDULER)
  b = {k: torch.from_numpy(v.transpose(0, 3, 1, 2).copy() if v.ndim == 4 else v).to(device)
       for k, v in make_batch(stage, batch, shape).items()}
  values: list = []

  def step():
    with torch.autocast(device_type=device.split(":")[0], dtype=torch.float16, enabled=autocast):
      with torch.no_grad():
        z = vae.encode(b["pixel_values"]).latent_dist.sample() * 0.18215
        hs = vision(pixel_values=b["pixel_values_clip"], output_hidden_states=True).hidden_states
      noise = torch.randn_like(z)
      t = torch.randint(0, 1000, (batch,), device=device)
      zt = sched.add_noise(z, noise, t)
      ids, idx = b["input_ids"].long(), b["index"].long()
      if stage == 1:
        words = mapper.global_words(ref.tapped(hs, (24, 4, 8, 12, 16)))
        ctx = ref.encode_text(text.text_model if hasattr(text, "text_model") else text, ids, words, idx)
        pred = unet(zt, t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise, reduction="none").mean([1, 2, 3]).mean() + \
            0.01 * words.abs().mean()
      else:
        with torch.no_grad():
          w0 = gmapper.global_words(ref.tapped(hs, (24, 4, 8, 12, 16)))[:, :1]
          hs_obj = vision(pixel_values=b["pixel_values_obj"], output_hidden_states=True).hidden_states
        ctx = ref.encode_text(text.text_model if hasattr(text, "text_model") else text, ids, w0, idx)
        local = mapper.local_tokens(ref.tapped(hs_obj, (24, 4, 8, 12, 16))) * b["token_mask"][..., None]
        values.clear()
        pred = unet(zt, t, ctx, cross_attention_kwargs=dict(local=local, index=idx, lam=1.0, values=values)).sample
        m = b["mask_values"]
        loss = ((torch.nn.functional.mse_loss(pred.float(), noise, reduction="none") * m).sum([1, 2, 3]) /
                m.sum([1, 2, 3])).mean() + 1e-4 * sum(v.abs().mean() for v in values) / len(values)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss
  return step


class _Recording:
  def __init__(self, kl, vl):
    self.inner = ref.EliteProcessor(kl, vl)
    self.kl, self.vl = kl, vl

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, local=None,
               index=None, lam=1.0, values=None):
    if encoder_hidden_states is not None and local is not None and values is not None:
      values.append(self.vl(local))
    return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, local, index, lam)


def cpu_matmul_peak() -> float:
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  t = median_time(lambda: f(a), 5, jax_sync)
  return 2 * n ** 3 / t


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", choices=tuple(SHAPES), default="small")
  p.add_argument("--batch", type=int, nargs="+", default=[2])
  p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--gpu", action="store_true")
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--json", help="append results to this JSON-lines file")
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  shape = SHAPES[args.shape]
  device = "cuda" if args.gpu else "cpu"
  tms = torch_models(shape, device)
  folder = write_checkpoints(shape, tms, Path(tempfile.mkdtemp(prefix="bench_train_")))
  peak = None if args.gpu else cpu_matmul_peak()
  if peak:
    print(f"CPU float32 matmul rate (2048^3, jax): {peak / 1e9:.1f} GFLOP/s (the 'peak' for CPU MFU)")
  for stage in args.stages:
    for batch in args.batch:
      row = {"stage": stage, "batch": batch, "shape": args.shape, "device": str(jax.devices()[0].device_kind),
             "date": time.strftime("%Y-%m-%d"), "native_attention": native.available()}
      for compute in (("float32", "bfloat16") if args.gpu else ("float32",)):
        fn, state, frozen, gb = jax_setup(shape, folder, stage, batch, compute)
        compiled = fn.lower(state, frozen, gb).compile()
        cost = compiled.cost_analysis()
        flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
        mem = compiled.memory_analysis()
        holder = {"s": state}

        def run():
          holder["s"], m = fn(holder["s"], frozen, gb)
          return m["loss"]
        t = median_time(run, args.reps, jax_sync)
        pk = PEAK_GPU[compute] if args.gpu else peak
        row[f"jax_{compute}"] = {"step_s": t, "samples_per_s": batch / t, "flops": flops, "mfu": flops / t / pk}
        # The compiled step's own footprint (arguments + outputs + temporaries - donated aliases), per config: the
        # device's peak counter would carry over from the configs measured before it in this process.
        need = 0
        if mem is not None:
          need = sum(int(getattr(mem, f, 0)) for f in ("argument_size_in_bytes", "output_size_in_bytes",
                                                       "temp_size_in_bytes")) - int(getattr(mem, "alias_size_in_bytes", 0))
        row[f"jax_{compute}"]["step_bytes"] = need
        print(f"stage {stage} batch {batch} jax {compute}: {t * 1e3:.0f} ms/step, {batch / t:.2f} samples/s, "
              f"{flops / 1e12:.3f} TFLOP/step, MFU {100 * flops / t / pk:.1f}%, step memory {need / 2**30:.2f} GiB",
              flush=True)
        holder.clear()
      if not args.skip_torch:
        for autocast in ((False, True) if args.gpu else (False,)):
          step = torch_step_fn(stage, tms, shape, batch, device, autocast)
          if args.gpu:
            torch.cuda.reset_peak_memory_stats()
          t = median_time(step, args.reps, torch_sync)
          key = "torch_fp16_autocast" if autocast else "torch_float32"
          row[key] = {"step_s": t, "samples_per_s": batch / t}
          if args.gpu:
            row[key]["peak_bytes"] = torch.cuda.max_memory_allocated()
          print(f"stage {stage} batch {batch} {key}: {t * 1e3:.0f} ms/step, {batch / t:.2f} samples/s", flush=True)
        ratio = row["torch_float32"]["step_s"] / row["jax_float32"]["step_s"]
        print(f"stage {stage} batch {batch}: jax float32 is {ratio:.2f}x the PyTorch float32 step throughput")
      if args.json:
        with open(args.json, "a") as f:
          f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
