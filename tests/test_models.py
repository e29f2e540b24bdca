"""Our Flax UNet, VAE and CLIP towers against current diffusers / transformers PyTorch classes (float32).

Each reference is saved with save_pretrained (safetensors or .bin) and read by our loaders, so the converter and the
loading code are what is tested, on the same random weights and inputs.
"""

import jax
import numpy as np
import pytest
import torch

from elite_jax.weights import pretrained
from elite_jax.errors import InputError
from elite_jax.models.clip import inject_words
from tests import elite_reference
from tests import tiny_models


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-12))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


# "auto" is the CPU kernel here; "xla" is what GPUs take (TPUs' Pallas kernel: tests/test_attention.py).
@pytest.mark.parametrize("variant,safe,size,attention", [
    ("sd1", True, (16, 16), "auto"), ("sd1", False, (10, 14), "auto"), ("sd1", True, (32, 24), "auto"),
    ("sd2", True, (16, 16), "auto"), ("sd1", True, (16, 16), "xla")])
def test_unet_matches_diffusers(tmp_path, variant, safe, size, attention):
  config = tiny_models.unet_config_sd1() if variant == "sd1" else tiny_models.unet_config_sd2()
  ref = tiny_models.make_unet(config, seed=1)
  ref.save_pretrained(tmp_path / "unet", safe_serialization=safe)
  module, params = pretrained.load_unet(tmp_path / "unet", attention_impl=attention)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, *size, 4), dtype=np.float32)
  t = np.array([3.0, 801.0], np.float32)
  ctx = rng.standard_normal((2, 77, config["cross_attention_dim"]), dtype=np.float32)
  out = jax.jit(module.apply)({"params": params}, x, t, ctx)
  with torch.no_grad():
    want = ref(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
  assert out.shape == want.shape
  assert _rel(out, want) < 2e-5


def test_unet_rejects_wrong_weights(tmp_path):
  tiny_models.make_unet(tiny_models.unet_config_sd1(), seed=1).save_pretrained(tmp_path / "unet")
  cfg = (tmp_path / "unet" / "config.json")
  cfg.write_text(cfg.read_text().replace('"cross_attention_dim": 32', '"cross_attention_dim": 64'))
  with pytest.raises(InputError, match="wrong shape"):
    pretrained.load_unet(tmp_path / "unet")


@pytest.mark.parametrize("old_names", [False, True])
def test_vae_matches_diffusers(tmp_path, old_names):
  ref = tiny_models.make_vae(seed=2)
  ref.save_pretrained(tmp_path / "vae")
  if old_names:  # SD v1-4's files: query/key/value/proj_attn, as a .bin pickle
    state = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"):
             v for k, v in ref.state_dict().items()}
    assert any(".query." in k for k in state)
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, tmp_path / "vae" / "diffusion_pytorch_model.bin")
  module, params = pretrained.load_vae(tmp_path / "vae")
  img = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  mean, logvar = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))(params, img)
  z = np.random.default_rng(2).standard_normal((2, 4, 4, 4)).astype(np.float32)
  dec = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.decode))(params, z)
  with torch.no_grad():
    dist = ref.encode(_nchw(img)).latent_dist
    want_dec = ref.decode(_nchw(z)).sample.permute(0, 2, 3, 1).numpy()
  assert _rel(mean, dist.mean.permute(0, 2, 3, 1).numpy()) < 2e-5
  assert _rel(logvar, dist.logvar.permute(0, 2, 3, 1).numpy()) < 2e-5
  assert _rel(dec, want_dec) < 2e-5


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("text")
  vocab = tiny_models.write_tokenizer(folder / "tokenizer")
  ref = tiny_models.make_text_encoder(vocab, seed=3)
  ref.save_pretrained(folder / "text_encoder")
  module, params = pretrained.load_text_encoder(folder / "text_encoder")
  return ref, module, params, vocab


@pytest.mark.parametrize("k,index", [(0, None), (1, [5, 2]), (5, [5, 0]), (5, [72, 60]), (1, [0, 76])])
def test_text_encoder_with_injection(text_encoder, k, index):
  ref, module, params, vocab = text_encoder
  rng = np.random.default_rng(k)
  ids = rng.integers(0, vocab - 2, (2, 77)).astype(np.int32)
  ids[:, 0], ids[:, 9:] = vocab - 2, vocab - 1  # BOS, prompt, EOS + padding as the tokenizer makes them
  words = rng.standard_normal((2, max(k, 1), tiny_models.TEXT_DIM)).astype(np.float32) if k else None
  idx = np.array(index, np.int32) if k else None
  last, pooled = jax.jit(module.apply)({"params": params}, ids, words, idx)
  t_ids = torch.from_numpy(ids).long()
  with torch.no_grad():
    embeds = ref.embeddings.token_embedding(t_ids)
    if k:
      embeds = elite_reference.inject(embeds, torch.from_numpy(words), torch.from_numpy(idx))  # spec 2.3
    h = ref.embeddings(input_ids=t_ids, inputs_embeds=embeds)  # positions added unshifted
    mask = torch.full((77, 77), torch.finfo(torch.float32).min).triu(1)[None, None]
    for layer in ref.encoder.layers:
      h = layer(h, mask)
    want = ref.final_layer_norm(h).numpy()
    stock = ref(input_ids=t_ids)
  assert _rel(last, want) < 1e-5
  if not k:  # no injection: the stock transformers forward, pooled output included
    assert _rel(last, stock.last_hidden_state.numpy()) < 1e-5
    assert _rel(pooled, stock.pooler_output.numpy()) < 1e-5


def test_inject_words_bos_and_tail():
  e = np.arange(2 * 77 * 1, dtype=np.float32).reshape(2, 77, 1)
  w = -np.ones((2, 5, 1), np.float32)
  out = np.asarray(inject_words(e, w, np.array([0, 72])))[..., 0]
  assert (out[0, :5] == -1).all() and (out[0, 5:] == e[0, 1:73, 0]).all()
  assert (out[1, :72] == e[1, :72, 0]).all() and (out[1, 72:] == -1).all()


@pytest.mark.parametrize("full_clip", [False, True])
def test_vision_encoder_hidden_states(tmp_path, full_clip):
  ref = tiny_models.make_vision_encoder(seed=4, full_clip=full_clip)
  ref.save_pretrained(tmp_path / "clip", safe_serialization=not full_clip)
  module, params = pretrained.load_image_encoder(tmp_path / "clip")
  pixels = np.random.default_rng(5).standard_normal((2, 224, 224, 3)).astype(np.float32)
  states, pooled = jax.jit(module.apply)({"params": params}, pixels)
  vision = ref.vision_model if full_clip else ref
  with torch.no_grad():
    out = vision(pixel_values=_nchw(pixels), output_hidden_states=True)
  assert len(states) == len(out.hidden_states) == 25
  for k in (0, 4, 8, 12, 16, 24):
    assert _rel(states[k], out.hidden_states[k].numpy()) < 1e-5, k
  assert _rel(states[-1], out.last_hidden_state.numpy()) < 1e-5  # no post layer norm on the tapped features
  assert _rel(pooled, out.pooler_output.numpy()) < 1e-5
