"""A PyTorch restatement of what the official ELITE code computes (ELITE_SPEC.md), for parity tests.

Written from the spec, not copied: the mapping networks (spec 1.2-1.3, 3.1), the text injection (2.3) and the
modified cross-attention (3.3), plugged into current diffusers' UNet2DConditionModel through its attention-processor
API, and the official sampling loop (6.2).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Mapper(nn.Module):
  """Spec 1.2-1.3 (global) and 3.1 (local): per word, an MLP for the CLS token and one for the patch tokens."""

  def __init__(self, input_dim: int, output_dim: int, hidden: int = 1024, words: int = 5):
    super().__init__()
    self.words = words
    for i in range(words):
      for name in (f"mapping_{i}", f"mapping_patch_{i}"):
        setattr(self, name, nn.Sequential(nn.Linear(input_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                                          nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                                          nn.Linear(hidden, output_dim)))

  def global_words(self, embs):
    out = []
    for i, e in enumerate(embs):
      out.append(getattr(self, f"mapping_{i}")(e[:, :1]) + getattr(self, f"mapping_patch_{i}")(e[:, 1:]).mean(
          dim=1, keepdim=True))
    return torch.cat(out, dim=1)

  def local_tokens(self, embs):
    out = [(getattr(self, f"mapping_{i}")(e[:, :1]) + getattr(self, f"mapping_patch_{i}")(e[:, 1:])).unsqueeze(0)
           for i, e in enumerate(embs)]
    return torch.cat(out, dim=0).mean(dim=0)


def tapped(hidden_states, layers=(24, 4, 8, 12, 16)):
  return [hidden_states[k] for k in layers]


def inject(embeds, words, index):
  new = embeds.clone()
  k = words.shape[1]
  for b, idx in enumerate(index.tolist()):
    n = new[b, idx + k:].shape[0]
    new[b, idx + k:] = embeds[b, idx + 1: idx + 1 + n]
    new[b, idx:idx + k] = words[b]
  return new


def encode_text(text_encoder, ids, words=None, index=None):
  """Spec 2.3 on a transformers 5 CLIPTextModel: inject, add unshifted positions, causal encoder, final LN."""
  embeds = text_encoder.embeddings.token_embedding(ids)
  if words is not None:
    embeds = inject(embeds, words, index)
  h = text_encoder.embeddings(input_ids=ids, inputs_embeds=embeds)
  n = ids.shape[1]
  mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
  for layer in text_encoder.encoder.layers:
    h = layer(h, mask)
  return text_encoder.final_layer_norm(h)


class EliteProcessor:
  """attn1: plain self-attention. attn2: the global K/V copies (installed as to_k/to_v) and, given a local
  context, + lambda * (M * softmax(Q Kl^T * scale)) Vl with M = a / a.max() over the whole call's batch; given
  IP-Adapter tokens ``ip``, + ip_scale * softmax(Q Kip^T * scale) Vip (IP-Adapter's decoupled term, the layer's own
  head width in the scale)."""

  def __init__(self, to_k_local: nn.Linear | None = None, to_v_local: nn.Linear | None = None, to_k_ip=None,
               to_v_ip=None):
    self.to_k_local, self.to_v_local = to_k_local, to_v_local
    self.to_k_ip, self.to_v_ip = to_k_ip, to_v_ip

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, local=None,
               index=None, lam=1.0, ip=None, ip_scale=1.0):
    cross = encoder_hidden_states is not None
    ctx = encoder_hidden_states if cross else hidden_states
    q = attn.head_to_batch_dim(attn.to_q(hidden_states))
    k = attn.head_to_batch_dim(attn.to_k(ctx))
    v = attn.head_to_batch_dim(attn.to_v(ctx))
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
    out = probs @ v
    if cross and local is not None:
      kl = attn.head_to_batch_dim(self.to_k_local(local))
      vl = attn.head_to_batch_dim(self.to_v_local(local))
      probs_local = (q @ kl.transpose(-1, -2) * attn.scale).softmax(dim=-1)
      idx = index.reshape(-1, 1).repeat((1, attn.heads)).reshape(-1)
      a = probs.permute(0, 2, 1)[torch.arange(idx.shape[0]), idx]
      m = a.unsqueeze(2) / a.max()
      out = out + (probs_local * m * lam) @ vl
    if cross and ip is not None:
      kip = attn.head_to_batch_dim(self.to_k_ip(ip))
      vip = attn.head_to_batch_dim(self.to_v_ip(ip))
      out = out + ip_scale * (q @ kip.transpose(-1, -2) * attn.scale).softmax(dim=-1) @ vip
    out = attn.batch_to_head_dim(out)
    return attn.to_out[1](attn.to_out[0](out))


class Proj(nn.Module):
  """A bias-free projection that uses the given weight tensor itself (so gradients reach it, if it wants them)."""

  def __init__(self, weight):
    super().__init__()
    self.weight = weight

  in_features = property(lambda self: self.weight.shape[1])
  out_features = property(lambda self: self.weight.shape[0])

  def forward(self, x):
    return x @ self.weight.T


def install_elite(unet, global_state: dict, local_state: dict | None = None, processor=EliteProcessor,
                  ip_state: dict | None = None):
  """The official K/V copies into a diffusers UNet (global -> each attn2's to_k/to_v, spec 3.4), ELITE processors on
  every attention (attn1 runs plain self-attention through them, as the official class patch does).

  ``ip_state``: an h94 IP-Adapter file's ``ip_adapter`` dict; the attn2 processors get its ``{id}.to_k_ip`` /
  ``to_v_ip``, numbered as diffusers' loader numbers them (1, 3, 5... over ``unet.attn_processors`` in order).
  """
  from tests.tiny_models import attn2_modules
  ip_ids = {}
  if ip_state is not None:
    attn2 = [n[:-len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    ip_ids = {name: 2 * k + 1 for k, name in enumerate(attn2)}
  processors = {}
  for name, module in unet.named_modules():
    if hasattr(module, "set_processor") and hasattr(module, "to_q"):
      key = name.replace(".", "_")
      kl = vl = kip = vip = None
      if name in ip_ids:
        kip, vip = Proj(ip_state[f"{ip_ids[name]}.to_k_ip.weight"]), Proj(ip_state[f"{ip_ids[name]}.to_v_ip.weight"])
      if name.endswith("attn2"):
        module.to_k, module.to_v = Proj(global_state[f"{key}_to_k.weight"]), Proj(global_state[f"{key}_to_v.weight"])
        if local_state is not None:
          kl, vl = Proj(local_state[f"{key}_to_k.weight"]), Proj(local_state[f"{key}_to_v.weight"])
      processors[f"{name}.processor"] = processor(kl, vl, kip, vip) if ip_ids else processor(kl, vl)
  assert len(attn2_modules(unet)) == sum(1 for k in processors if "attn2" in k)
  unet.set_attn_processor(processors)  # (consumes the dict)
  return unet


def load_mapper(state: dict, input_dim: int, output_dim: int) -> Mapper:
  hidden = state["mapping_0.0.weight"].shape[0]
  m = Mapper(input_dim, output_dim, hidden)
  m.load_state_dict({k: v for k, v in state.items() if k.startswith("mapping")})
  return m.eval()


def clip_image(pixels_nchw, vision_model):
  return vision_model(pixel_values=pixels_nchw, output_hidden_states=True).hidden_states


def official_generate(*, unet, vae, text_encoder, tokenizer, vision_model, global_state, local_state, pixels_clip,
                      pixels_obj, mask16, prompt, index, latents, steps=100, guidance=5.0, lam=0.8,
                      scaling=0.18215, words="primary", controlnet=None, control_image=None, control_scale=1.0,
                      control_start=0.0, control_end=1.0, ip_tokens=None, ip_scale=1.0):
  """The official inference loop (spec 6.2): LMS, two separate UNet calls, CFG, VAE decode, uint8.

  pixels_* NCHW float32 CLIP-normalised; mask16 (1, 256, 1); latents (1, 4, h, w) standard normal.

  Composition (not in the official code): ``controlnet`` (diffusers' ControlNetModel) runs beside each UNet call on
  the same latents and text, with ``control_image`` (1, 3, H, W) in [0, 1] and ``control_scale`` times diffusers'
  keep rule for ``control_start``/``_end``; its residuals go in as ``down_block_additional_residuals``.
  ``ip_tokens`` = (conditional, unconditional) IP-Adapter tokens for the processors ``install_elite(ip_state=...)``
  installed, weighed by ``ip_scale``.
  """
  from diffusers import LMSDiscreteScheduler
  with torch.no_grad():
    text_dim = text_encoder.config.hidden_size
    gmap = load_mapper(global_state, vision_model.config.hidden_size, text_dim)
    w = gmap.global_words(tapped(clip_image(pixels_clip, vision_model)))
    w = w[:, 0:1] if words == "primary" else w
    ids = tokenizer([prompt], padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    uncond_ids = tokenizer([""], padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
    idx = torch.tensor([index])
    cond = encode_text(text_encoder, ids, w, idx)
    uncond = encode_text(text_encoder, uncond_ids)
    local = None
    if local_state is not None:
      lmap = load_mapper(local_state, vision_model.config.hidden_size, text_dim)
      local = lmap.local_tokens(tapped(clip_image(pixels_obj, vision_model))) * mask16
    sched = LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 num_train_timesteps=1000, timestep_spacing="linspace")
    sched.set_timesteps(steps)
    x = latents * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
      xin = sched.scale_model_input(x, t)
      kwargs = {"local": local, "index": idx, "lam": lam} if local is not None else {}
      kw_u = {}
      if ip_tokens is not None:
        kwargs, kw_u = dict(kwargs, ip=ip_tokens[0], ip_scale=ip_scale), {"ip": ip_tokens[1], "ip_scale": ip_scale}
      res_c = res_u = {}
      if controlnet is not None:
        keep = 1.0 - float(i / steps < control_start or (i + 1) / steps > control_end)
        res = lambda ctx: dict(zip(("down_block_additional_residuals", "mid_block_additional_residual"), controlnet(
            xin, t, ctx, controlnet_cond=control_image, conditioning_scale=control_scale * keep, return_dict=False)))
        res_c, res_u = res(cond), res(uncond)
      e_c = unet(xin, t, cond, cross_attention_kwargs=kwargs, **res_c).sample
      e_u = unet(xin, t, uncond, cross_attention_kwargs=kw_u or None, **res_u).sample
      x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    img = vae.decode(x / scaling).sample
    img = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
  return (img * 255).round().astype(np.uint8)
