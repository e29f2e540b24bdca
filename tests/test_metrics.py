"""The metric models and scores: Flax DINO ViT and CLIP B/32 against transformers, the preprocessing against the
authors' torchvision transforms restated with PIL + torch, the scores on embeddings with known cosines."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from elite_jax import preprocess, text
from elite_jax.eval import metrics
from elite_jax.weights import pretrained
from elite_jax.errors import InputError
from elite_jax.models.clip import CLIPModel
from elite_jax.models.vit import ViTModel
from tests import tiny_models

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "tests" / "data" / "dreambench").glob("*/*.jpg"))


def _rel(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(b)).max() + 1e-12))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------------------------------------------------------
# Tiny checkpoints laid out as the real ones (also used by test_evaluate)
# ---------------------------------------------------------------------------------------------------------------

def write_clip_b32(folder: Path, seed: int = 0):
  """A CLIPModel shaped like openai/clip-vit-base-patch32 (224 px, 32 px patches, quick_gelu, the hub's legacy
  eos_token_id 2 -> argmax pooling), narrow and shallow, with a tokenizer in the same folder; returns the torch
  model."""
  from transformers import CLIPConfig, CLIPModel as TorchCLIP
  vocab = tiny_models.write_tokenizer(folder)
  text_cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0,
                  eos_token_id=2, pad_token_id=1)
  vision_cfg = dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
  torch.manual_seed(seed)
  model = tiny_models.randomize(TorchCLIP(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg,
                                                     projection_dim=16)), seed, scale=0.02)
  model.save_pretrained(folder)
  return model


def write_dino(folder: Path, seed: int = 0, *, pooler: bool = False, safe: bool = True, eps: float = 1e-12):
  """A ViTModel shaped like facebook/dino-vits16 (224 px, 16 px patches, gelu, and the hub config's LayerNorm eps
  1e-12), narrow and shallow; returns the torch model."""
  from transformers import ViTConfig, ViTModel as TorchViT
  cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, layer_norm_eps=eps, hidden_act="gelu", qkv_bias=True)
  torch.manual_seed(seed)
  model = tiny_models.randomize(TorchViT(cfg, add_pooling_layer=pooler), seed, scale=0.02)
  model.save_pretrained(folder, safe_serialization=safe)
  return model


def set_layer_norm_eps(model: torch.nn.Module, eps: float) -> torch.nn.Module:
  """torch.hub's DINO has LayerNorm eps 1e-6 where the hub ViT config says 1e-12: the reference we compare with."""
  for m in model.modules():
    if isinstance(m, torch.nn.LayerNorm):
      m.eps = eps
  return model


# ---------------------------------------------------------------------------------------------------------------
# Models against transformers
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooler,safe,eps", [(False, True, None), (True, False, 1e-6)])
def test_dino_vit_matches_transformers(tmp_path, pooler, safe, eps):
  ref = write_dino(tmp_path / "dino", seed=3, pooler=pooler, safe=safe)
  config = json.loads((tmp_path / "dino" / "config.json").read_text())
  assert config["model_type"] == "vit" and config["layer_norm_eps"] == 1e-12
  module, params = pretrained.load_dino(tmp_path / "dino", layer_norm_eps=eps)
  assert module.config.layer_norm_eps == (eps or 1e-12) and module.config.patch_size == 16
  if eps:
    set_layer_norm_eps(ref, eps)
  pixels = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):  # as metrics.py runs them (GPUs default to TF32-like passes)
    hidden = jax.jit(module.apply)({"params": params}, pixels)
    cls = jax.jit(lambda p, x: module.apply({"params": p}, x, method=ViTModel.cls_features))(params, pixels)
  with torch.no_grad():
    want = ref(pixel_values=_nchw(pixels)).last_hidden_state.numpy()
  assert hidden.shape == want.shape == (2, 197, 32)
  assert _rel(hidden, want) < 1e-5
  assert _rel(cls, want[:, 0]) < 1e-5
  # the logical axis names of layers.py are on the parameters
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), pixels[:1]))["params"]
  q = boxed["encoder"]["layer_0"]["attention"]["attention"]["query"]["kernel"]
  assert q.names == ("embed", "heads")


def test_dino_loader_takes_in_memory_names(tmp_path):
  """transformers 5 names ViT layers layers.N.attention.q_proj / mlp.fc1 in memory (and saves the hub's names)."""
  import safetensors.torch
  ref = write_dino(tmp_path / "dino", seed=4)
  state = ref.state_dict()
  assert any(k.startswith("layers.0.attention.q_proj") for k in state)
  (tmp_path / "dino" / "model.safetensors").unlink()
  safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                              str(tmp_path / "dino" / "model.safetensors"))
  module, params = pretrained.load_dino(tmp_path / "dino")
  pixels = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    got = module.apply({"params": params}, pixels)
  with torch.no_grad():
    assert _rel(got, ref(pixel_values=_nchw(pixels)).last_hidden_state.numpy()) < 1e-5


def test_dino_loader_rejects_other_models(tmp_path):
  tiny_models.make_vision_encoder(seed=1).save_pretrained(tmp_path / "clip")
  with pytest.raises(InputError, match="not a plain ViT"):
    pretrained.load_dino(tmp_path / "clip")
  write_dino(tmp_path / "dino")
  cfg = json.loads((tmp_path / "dino" / "config.json").read_text())
  (tmp_path / "dino" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48}))
  with pytest.raises(InputError, match="does not fit"):
    pretrained.load_dino(tmp_path / "dino")


def test_clip_b32_features_match_transformers(tmp_path):
  ref = write_clip_b32(tmp_path / "clip", seed=5)
  cfg = json.loads((tmp_path / "clip" / "config.json").read_text())
  assert cfg["text_config"]["eos_token_id"] == 2 and cfg["vision_config"]["patch_size"] == 32
  module, params = pretrained.load_clip(tmp_path / "clip")
  assert module.vision.num_patches == 49 and module.text.eos_token_id == 2 and module.projection_dim == 16
  tokenizer = pretrained.load_tokenizer(tmp_path / "clip")
  ids = text.tokenize(tokenizer, ["a dog in the jungle", "a red teapot", "a cube shaped backpack on the beach"])
  pixels = np.random.default_rng(1).standard_normal((3, 224, 224, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    got_t = jax.jit(lambda p, x: module.apply({"params": p}, x, method=CLIPModel.get_text_features))(params, ids)
    got_i = jax.jit(lambda p, x: module.apply({"params": p}, x, method=CLIPModel.get_image_features))(params, pixels)
  with torch.no_grad():
    want_t = ref.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    want_i = ref.get_image_features(pixel_values=_nchw(pixels))
  want_t = getattr(want_t, "pooler_output", want_t).numpy()  # transformers 5 returns an output object
  want_i = getattr(want_i, "pooler_output", want_i).numpy()
  assert got_t.shape == want_t.shape == (3, 16) and got_i.shape == want_i.shape == (3, 16)
  assert _rel(got_t, want_t) < 1e-5
  assert _rel(got_i, want_i) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing against the authors' transforms, restated
# ---------------------------------------------------------------------------------------------------------------

def torchvision_transform(image: np.ndarray, resize: int, crop: int, mean, std) -> np.ndarray:
  """torchvision 0.14 on a PIL image: Resize(resize, BICUBIC), CenterCrop(crop), ToTensor(), Normalize(mean, std)."""
  img = Image.fromarray(image)
  w, h = img.size  # F_pil.resize with an int size: the shorter side to `resize`, the longer truncated
  short, long = (w, h) if w <= h else (h, w)
  if short != resize:
    new_short, new_long = resize, int(resize * long / short)
    img = img.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BICUBIC)
  w, h = img.size  # F.center_crop
  top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
  img = img.crop((left, top, left + crop, top + crop))
  t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # ToTensor
  t = t.sub(torch.tensor(mean, dtype=torch.float32)[:, None, None]).div(
      torch.tensor(std, dtype=torch.float32)[:, None, None])  # Normalize
  return t.permute(1, 2, 0).numpy()


def _test_images():
  rng = np.random.default_rng(2)
  shapes = [(384, 512), (512, 341), (224, 224), (64, 64), (257, 300), (300, 257), (225, 999)]
  made = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in shapes]
  return made + [preprocess.load_image(p) for p in PHOTOS[:3]]


def test_preprocessing_is_bit_exact_with_the_authors_transforms():
  for image in _test_images():
    clip = metrics.clip_pixels(image)
    want = torchvision_transform(image, 224, 224, preprocess.CLIP_MEAN, preprocess.CLIP_STD)
    assert clip.shape == (224, 224, 3) and clip.dtype == np.float32
    np.testing.assert_array_equal(clip, want)
    dino = metrics.dino_pixels(image)
    np.testing.assert_array_equal(dino, torchvision_transform(image, 256, 224, metrics.IMAGENET_MEAN,
                                                              metrics.IMAGENET_STD))


def test_resize_center_crop_geometry():
  # 341x256 (WxH) is already Resize(256)'d; CenterCrop(224): left = round(58.5) = 58 (Python rounds half to even)
  col = np.zeros((256, 341, 3), np.uint8)
  col[:, 58] = 255
  out = metrics.resize_center_crop(col, 256, 224)
  assert out.shape == (224, 224, 3)
  assert (out[:, 0] == 255).all()
  assert (out[:, 1] == 0).all()
  # 512x384 -> 341x256 (int(256 * 512 / 384) = 341, truncated)
  assert metrics.resize_center_crop(np.zeros((384, 512, 3), np.uint8), 256, 256).shape == (256, 256, 3)
  with pytest.raises(InputError):
    metrics.resize_center_crop(np.zeros((4, 4), np.uint8), 256, 224)


# ---------------------------------------------------------------------------------------------------------------
# Scores on hand-made embeddings
# ---------------------------------------------------------------------------------------------------------------

def test_scores_on_known_cosines():
  e1, e2, e3 = np.eye(3)
  at60 = 3.0 * (0.5 * e1 + math.sqrt(3) / 2 * e2)  # 60 degrees from e1, not unit length
  assert metrics.cosine_matrix(e1[None], e2[None])[0, 0] == 0.0
  assert metrics.cosine_matrix(e1[None], at60[None])[0, 0] == pytest.approx(0.5, abs=1e-12)
  # CLIP-T pairs image i with text i only: cosines 1, 0.5, 0 -> 0.5
  images = np.stack([e1, e1, e3]) * 7
  texts = np.stack([e1, at60, e2])
  assert metrics.clip_t_score(images, texts) == pytest.approx(0.5, abs=1e-12)
  # CLIP-I / DINO-I: all pairs. generated (e1, e2) x real (e1, 60deg, e3): [[1, .5, 0], [0, cos30, 0]]
  got = metrics.image_similarity(np.stack([e1, e2]), np.stack([e1, at60, e3]))
  assert got == pytest.approx((1 + 0.5 + 0 + 0 + math.sqrt(3) / 2 + 0) / 6, abs=1e-12)
  assert metrics.image_similarity(np.stack([e1, -e1]), e1[None]) == pytest.approx(0.0, abs=1e-12)
  unit = metrics.l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
  np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0]])
  with pytest.raises(ValueError):
    metrics.clip_t_score(np.ones((2, 3)), np.ones((1, 3)))


def test_strip_placeholder():
  assert metrics.strip_placeholder("a S dog in the jungle", "S") == "a dog in the jungle"
  assert metrics.strip_placeholder("a cube shaped S stuffed animal", "S") == "a cube shaped stuffed animal"
  # only the word itself: "S." is not the placeholder (nor does the pipeline accept it as one)
  assert metrics.strip_placeholder("a S  dog with a Santa hat, S.", "S") == "a dog with a Santa hat, S."
  assert metrics.strip_placeholder("a sks dog", "sks") == "a dog"


def test_batched_features_equal_one_by_one(tmp_path):
  models = metrics.random_metric_models(seed=1, batch_size=4)
  assert models.random and models.clip.vision.patch_size == 32
  images = _test_images()[:5]
  together = models.clip_image_features(images)  # batches of 4 + 1 padded to 4
  models.batch_size = 1
  alone = models.clip_image_features(images)
  assert together.shape == (5, 16)
  np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-12)
  np.testing.assert_allclose(together, alone, atol=1e-6)
  models.batch_size = 4
  d = models.dino_features(images)
  assert d.shape == (5, 32) and np.allclose(np.linalg.norm(d, axis=1), 1.0)
  t = models.clip_text_features(["a dog in the jungle", "a red teapot", "a dog in the jungle"])
  assert t.shape == (3, 16) and np.allclose(t[0], t[2]) and not np.allclose(t[0], t[1])
