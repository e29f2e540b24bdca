"""ELITE's own parts against the PyTorch restatement of the spec (tests/elite_reference.py), float32.

Mappers from official-format .pt files (spec 7) and their export back; the ELITE cross-attention (spec 3.3) alone and
inside a whole tiny UNet (diffusers' UNet2DConditionModel with the restated processor) for cond+local and uncond.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from elite_jax.concept import merge_kv
from elite_jax.errors import InputError
from elite_jax.models.elite_attention import Attention, LocalInputs
from elite_jax.models.mappers import GlobalMapper, LocalMapper, MapperConfig
from elite_jax.models.unet import UNetConfig
from elite_jax.weights import pretrained
from elite_jax.weights.mapper_files import load_mapper, save_mapper
from tests import elite_reference as ref
from tests import tiny_models


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-12))


@pytest.fixture(scope="module")
def real_size_mappers(tmp_path_factory):
  """Official-format files at ELITE's real mapper sizes (1024 -> 1024 -> 768, 5 words), for a UNet with 768 context."""
  folder = tmp_path_factory.mktemp("mappers")
  unet = tiny_models.make_unet(tiny_models.unet_config_sd1(cross_attention_dim=768), seed=0)
  out = {}
  for kind, seed in (("global", 1), ("local", 2)):
    state = tiny_models.mapper_state_for(unet, input_dim=1024, output_dim=768, hidden=1024, seed=seed, context_dim=768)
    torch.save(state, folder / f"{kind}_mapper.pt")
    out[kind] = state
  return folder, out, UNetConfig.from_diffusers(dict(unet.config))


def test_official_mappers_load_and_match(real_size_mappers):
  folder, states, unet_cfg = real_size_mappers
  rng = np.random.default_rng(0)
  feats = [rng.standard_normal((2, 257, 1024)).astype(np.float32) for _ in range(5)]
  mask = (rng.uniform(size=(2, 256)) > 0.5).astype(np.float32)
  for kind in ("global", "local"):
    m = load_mapper(folder / f"{kind}_mapper.pt", unet_cfg, kind)
    cfg = m.config
    assert cfg == MapperConfig() and m.kind == kind  # ELITE's sizes are read off the file
    tm = ref.load_mapper(states[kind], 1024, 768)
    with torch.no_grad():
      tf = [torch.from_numpy(f) for f in feats]
      want = tm.global_words(tf) if kind == "global" else tm.local_tokens(tf) * torch.from_numpy(mask)[..., None]
    if kind == "global":
      got = GlobalMapper(cfg).apply({"params": m.mlp}, feats)
      assert got.shape == (2, 5, 768)
    else:
      got = LocalMapper(cfg).apply({"params": m.mlp}, feats, mask)
      assert got.shape == (2, 256, 768)
      assert (np.asarray(got)[mask == 0] == 0).all()
    assert _rel(got, want.numpy()) < 1e-5
    # the K/V copies land on every attn2, transposed, under the kind's names
    layers = unet_cfg.cross_attention_layers()
    assert len(jax.tree.leaves(m.kv)) == 2 * len(layers) == len([k for k in states[kind] if "attn2" in k])
    (path, width), suffix = layers[-1], "_local" if kind == "local" else ""
    node = m.kv
    for p in path:
      node = node[p]
    key = "_".join(path) + "_to_v.weight"
    np.testing.assert_array_equal(node["to_v" + suffix]["kernel"], states[kind][key].numpy().T)
    assert node["to_v" + suffix]["kernel"].shape == (768, width)


def test_export_round_trip(real_size_mappers, tmp_path):
  folder, states, unet_cfg = real_size_mappers
  for kind in ("global", "local"):
    m = load_mapper(folder / f"{kind}_mapper.pt", unet_cfg, kind)
    save_mapper(tmp_path / f"{kind}.pt", m, unet_cfg)
    back = torch.load(tmp_path / f"{kind}.pt", map_location="cpu", weights_only=True)
    assert list(back) == list(states[kind])  # the official key order
    for k in back:
      assert torch.equal(back[k], states[kind][k]), k
    save_mapper(tmp_path / f"{kind}.safetensors", m, unet_cfg)
    m2 = load_mapper(tmp_path / f"{kind}.safetensors", unet_cfg, kind)
    assert (m2.config, m2.kind) == (m.config, m.kind)
    jax.tree.map(np.testing.assert_array_equal, m2, m)
  with pytest.raises(InputError, match="is a local mapper"):
    load_mapper(tmp_path / "local.safetensors", unet_cfg, "global")


def test_mapper_that_does_not_fit_the_unet(real_size_mappers, tmp_path):
  folder, states, unet_cfg = real_size_mappers
  other = UNetConfig.from_diffusers(tiny_models.unet_config_sd1(cross_attention_dim=32))
  with pytest.raises(InputError, match="does not fit"):
    load_mapper(folder / "global_mapper.pt", other, "global")
  bad = dict(states["global"])
  bad.pop(next(k for k in bad if k.endswith("attn2_to_v.weight")))
  torch.save(bad, tmp_path / "partial.pt")
  with pytest.raises(InputError, match="does not fit|no key/value"):
    load_mapper(tmp_path / "partial.pt", unet_cfg, "global")
  (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
  with pytest.raises(InputError):
    load_mapper(tmp_path / "junk.pt", unet_cfg, "global")


# ---------------------------------------------------------------------------------------------------------------
# The cross-attention module alone
# ---------------------------------------------------------------------------------------------------------------

class _TorchAttn(torch.nn.Module):
  """Just what EliteProcessor reads from diffusers' Attention."""

  def __init__(self, dim, ctx, heads, head_dim):
    super().__init__()
    inner = heads * head_dim
    self.heads, self.scale = heads, head_dim ** -0.5
    self.to_q = torch.nn.Linear(dim, inner, bias=False)
    self.to_k = torch.nn.Linear(ctx, inner, bias=False)
    self.to_v = torch.nn.Linear(ctx, inner, bias=False)
    self.to_out = torch.nn.ModuleList([torch.nn.Linear(inner, dim), torch.nn.Dropout(0.0)])

  def head_to_batch_dim(self, x):  # (B, L, h*d) -> (B*h, L, d), batch-major
    b, l, c = x.shape
    return x.reshape(b, l, self.heads, c // self.heads).permute(0, 2, 1, 3).reshape(b * self.heads, l, -1)

  def batch_to_head_dim(self, x):
    bh, l, d = x.shape
    return x.reshape(bh // self.heads, self.heads, l, d).permute(0, 2, 1, 3).reshape(bh // self.heads, l, -1)


@pytest.fixture(scope="module")
def attention_case():
  torch.manual_seed(0)
  dim, ctx, heads, head_dim = 24, 16, 4, 6
  tm = tiny_models.randomize(_TorchAttn(dim, ctx, heads, head_dim), 0, 0.3)
  kl, vl = torch.nn.Linear(ctx, heads * head_dim, bias=False), torch.nn.Linear(ctx, heads * head_dim, bias=False)
  params = {"to_q": {"kernel": tm.to_q.weight.detach().numpy().T}, "to_k": {"kernel": tm.to_k.weight.detach().numpy().T},
            "to_v": {"kernel": tm.to_v.weight.detach().numpy().T},
            "to_k_local": {"kernel": kl.weight.detach().numpy().T}, "to_v_local": {"kernel": vl.weight.detach().numpy().T},
            "to_out_0": {"kernel": tm.to_out[0].weight.detach().numpy().T, "bias": tm.to_out[0].bias.detach().numpy()}}
  module = Attention(heads, head_dim, dim)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 20, dim)).astype(np.float32)
  c = rng.standard_normal((3, 77, ctx)).astype(np.float32)
  e = rng.standard_normal((3, 256, ctx)).astype(np.float32)
  e[:, rng.uniform(size=256) > 0.4] = 0  # masked tokens: zero keys and values, kept in the softmax
  return tm, ref.EliteProcessor(kl, vl), module, params, x, c, e


@pytest.mark.parametrize("lam", [0.0, 0.8, 1.0])
def test_elite_attention_single_max_over_batch(attention_case, lam):
  tm, proc, module, params, x, c, e = attention_case
  index = np.array([5, 2, 9])
  local = LocalInputs(jnp.asarray(e), jnp.asarray(index), jnp.full((3,), lam), max_group=3)
  got = module.apply({"params": params}, x, c, local)
  with torch.no_grad():
    want = proc(tm, torch.from_numpy(x), torch.from_numpy(c), local=torch.from_numpy(e),
                index=torch.from_numpy(index), lam=lam)
  assert _rel(got, want.numpy()) < 1e-5


def test_elite_attention_per_sample_max_and_uncond_rows(attention_case):
  """max_group=1 equals separate calls per sample; rows past the local batch are plain (uncond) attention."""
  tm, proc, module, params, x, c, e = attention_case
  index = np.array([4, 7])
  local = LocalInputs(jnp.asarray(e[:2]), jnp.asarray(index), jnp.array([0.8, 0.8]), max_group=1)
  got = np.asarray(module.apply({"params": params}, x, c, local))
  with torch.no_grad():
    for b in range(2):
      want = proc(tm, torch.from_numpy(x[b:b + 1]), torch.from_numpy(c[b:b + 1]), local=torch.from_numpy(e[b:b + 1]),
                  index=torch.from_numpy(index[b:b + 1]), lam=0.8)
      assert _rel(got[b:b + 1], want.numpy()) < 1e-5
    plain = proc(tm, torch.from_numpy(x[2:]), torch.from_numpy(c[2:]))
  assert _rel(got[2:], plain.numpy()) < 1e-5
  # and the single max over a batch really differs from per-sample maxima (the quirk is observable)
  coupled = np.asarray(module.apply({"params": params}, x[:2], c[:2], local.replace(max_group=2)))
  assert np.abs(coupled - got[:2]).max() > 1e-4


def test_elite_attention_self_attention(attention_case):
  tm, proc, module, params, x, c, e = attention_case
  p = {k: v for k, v in params.items() if "local" not in k}
  p["to_k"] = {"kernel": np.asarray(tm.to_k.weight.detach().numpy().T)}
  self_module = Attention(4, 6, 24)
  sp = dict(p)
  sp["to_k"] = {"kernel": np.random.default_rng(3).standard_normal((24, 24)).astype(np.float32) * 0.2}
  sp["to_v"] = {"kernel": np.random.default_rng(4).standard_normal((24, 24)).astype(np.float32) * 0.2}
  got = self_module.apply({"params": sp}, x)
  t = _TorchAttn(24, 24, 4, 6)
  with torch.no_grad():
    t.to_q.weight.copy_(torch.from_numpy(sp["to_q"]["kernel"].T))
    t.to_k.weight.copy_(torch.from_numpy(sp["to_k"]["kernel"].T))
    t.to_v.weight.copy_(torch.from_numpy(sp["to_v"]["kernel"].T))
    t.to_out[0].weight.copy_(torch.from_numpy(sp["to_out_0"]["kernel"].T))
    t.to_out[0].bias.copy_(torch.from_numpy(sp["to_out_0"]["bias"]))
    want = proc(t, torch.from_numpy(x))
  assert _rel(got, want.numpy()) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# A whole tiny UNet with ELITE
# ---------------------------------------------------------------------------------------------------------------

def test_unet_with_elite_matches_reference(tmp_path):
  config = tiny_models.unet_config_sd1()
  tunet = tiny_models.make_unet(config, seed=5)
  tunet.save_pretrained(tmp_path / "unet")
  gstate = tiny_models.mapper_state_for(tunet, input_dim=16, output_dim=32, hidden=24, seed=6, context_dim=32)
  lstate = tiny_models.mapper_state_for(tunet, input_dim=16, output_dim=32, hidden=24, seed=7, context_dim=32)
  torch.save(gstate, tmp_path / "g.pt")
  torch.save(lstate, tmp_path / "l.pt")
  module, params = pretrained.load_unet(tmp_path / "unet")
  unet_cfg = module.config
  p = merge_kv(params, load_mapper(tmp_path / "g.pt", unet_cfg, "global").kv,
               load_mapper(tmp_path / "l.pt", unet_cfg, "local").kv)
  ref.install_elite(tunet, gstate, lstate)

  rng = np.random.default_rng(8)
  x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
  e = rng.standard_normal((2, 256, 32)).astype(np.float32) * (rng.uniform(size=(1, 256, 1)) > 0.5)
  index = np.array([5, 3])
  t = np.array([500.0, 500.0], np.float32)
  local = LocalInputs(jnp.asarray(e, jnp.float32), jnp.asarray(index), jnp.full((2,), 0.8), max_group=2)
  apply = jax.jit(module.apply)
  got_local = apply({"params": p}, x, t, ctx, local)
  got_uncond = apply({"params": p}, x, t, ctx)
  nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    want_local = tunet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), cross_attention_kwargs=dict(
        local=torch.from_numpy(e.astype(np.float32)), index=torch.from_numpy(index), lam=0.8)).sample
    want_uncond = tunet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
  assert _rel(got_local, want_local.permute(0, 2, 3, 1).numpy()) < 2e-5
  assert _rel(got_uncond, want_uncond.permute(0, 2, 3, 1).numpy()) < 2e-5
  assert np.abs(np.asarray(got_local) - np.asarray(got_uncond)).max() > 1e-3  # the local branch is live
