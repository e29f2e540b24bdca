"""One vision transformer for every image encoder (CLIP, DINO, DINOv2, SigLIP), in Flax; and DINO v1's ViT.

Patches (a strided convolution), an optional class token, position embeddings (resampled bicubically where the
input grid is not the checkpoint's, as DINOv2), optional register tokens, an optional layer norm before the first
layer (CLIP), n blocks (models/transformer.py, unrolled or one nn.scan), a final layer norm over every token or over
the class token alone (CLIP's pooled output). A family is a frozen config dataclass with transformers' field names
(its json parses into it) and a ``Layout``: where its checkpoint keeps each parameter and which of the options above
it takes. Every encoder maps NHWC pixels to ``(hidden_states, final)``: hidden_states[0] the embeddings (after the
pre-norm, if any), hidden_states[k] the residual stream after layer k (transformers' ``output_hidden_states``),
``final`` the final-normed last state (CLIP: its pooled class token).

DINO v1 (the DINO-I metric's ViT-S/16, transformers' ViTModel as facebook/dino-vits16 saves it) is the plainest
family and lives here; CLIP's is in models/clip.py, DINOv2's and SigLIP's in models/encoders.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elite_jax.errors import InputError
from elite_jax.models import layers
from elite_jax.models.layers import CONV_IN, CONV_OUT, EMBED, VOCAB
from elite_jax.models.scan import layer_stack
from elite_jax.models.transformer import VIT_BLOCK, Block, BlockNames, Path, Tree
from elite_jax.types import Dtype, Params


@dataclasses.dataclass(frozen=True)
class Layout:
  """A family's parameter names (its checkpoint's, so that ``torch_to_flax`` maps it) and structural options."""
  family: str  # elite_jax's name of the family ("clip", "dinov2"...)
  title: str  # for messages
  block: BlockNames
  patch: Path  # the patch convolution
  patch_bias: bool
  pos: Path  # position embeddings
  cls: Path | None = None  # the class token, where the family has one
  registers: Path | None = None  # register tokens (their number is the config's num_register_tokens)
  # Class token (C,) and positions (N, C) as CLIP's nn.Parameter and nn.Embedding weight, else (1, 1, C), (1, N, C).
  flat_tokens: bool = False
  pre_norm: Path | None = None  # CLIP's layer norm before the first layer
  layers: Path = ("encoder", "layers")  # unrolled: <path>_i; scanned: <path> (models/scan.py)
  final_norm: Path = ("layernorm",)
  pool_cls: bool = False  # the final norm over the class token alone (CLIP's pooled output), not every token


class VisionConfig:
  """What the ViT reads of a family's config beyond transformers' size fields (hidden_size, intermediate_size,
  num_hidden_layers, num_attention_heads, patch_size, image_size, num_channels, hidden_act, layer_norm_eps); a
  family's dataclass may make any of these attributes a field."""
  layout: ClassVar[Layout]
  qkv_bias: bool = True
  num_register_tokens: int = 0
  interpolation: str = ""  # how positions are resampled to another grid: "", "bicubic", "bicubic-antialias"

  @property
  def pixels(self) -> int:
    """The side of the square images the encoder takes (the checkpoint's grid: ``image_size``, unless resampled)."""
    return self.image_size

  @property
  def num_patches(self) -> int:
    return (self.pixels // self.patch_size) ** 2


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=None)
def torch_bicubic_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
  """(out, in) weights of ``F.interpolate(mode="bicubic", align_corners=False[, antialias=True])`` along one axis.

  Without antialias: Keys' a = -0.75 at src = (dst + 0.5) * in / out - 0.5, borders clamped. With antialias (the
  PIL-style filter torch uses): a = -0.5, support widened by the downscale factor, weights normalised.
  """
  scale = in_size / out_size
  w = np.zeros((out_size, in_size), np.float64)
  for o in range(out_size):
    if not antialias:
      x = (o + 0.5) * scale - 0.5
      i0 = int(np.floor(x))
      t = x - i0
      for j, d in zip(range(i0 - 1, i0 + 3), (1 + t, t, 1 - t, 2 - t)):
        w[o, min(max(j, 0), in_size - 1)] += _cubic(np.asarray(d), -0.75)
    else:
      support = 2.0 * max(scale, 1.0)
      center = scale * (o + 0.5)
      lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
      js = np.arange(lo, hi)
      k = _cubic((js - center + 0.5) / max(scale, 1.0), -0.5)
      w[o, lo:hi] = k / k.sum()
  return w.astype(np.float32)


def _embed(t: Tree, cfg: VisionConfig, dtype: Dtype, pixels: jax.Array) -> jax.Array:
  """Pixels -> tokens: [class token,] [registers,] patches, with positions added to the class token and patches."""
  lay, c, p = cfg.layout, cfg.hidden_size, cfg.patch_size
  if pixels.shape[1:3] != (cfg.pixels, cfg.pixels):
    raise InputError(f"this {lay.title} takes {cfg.pixels}x{cfg.pixels} images, got {pixels.shape[2]}x"
                     f"{pixels.shape[1]}")
  init = lambda ax: nn.with_logical_partitioning(nn.initializers.lecun_normal(), ax)
  conv = lambda m, x: nn.Conv(c, (p, p), strides=(p, p), padding="VALID", use_bias=lay.patch_bias, dtype=dtype,
                              kernel_init=init((None, None, CONV_IN, CONV_OUT)),
                              bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (CONV_OUT,)),
                              name=lay.patch[-1])(x)
  x = t.at(lay.patch[:-1], conv, pixels.astype(dtype))
  b = x.shape[0]
  x = x.reshape(b, -1, c)  # row-major over the patch grid, as torch's flatten(2)
  normal = nn.initializers.normal(0.02)
  token_axes = (EMBED,) if lay.flat_tokens else (None, None, EMBED)
  tokens = []
  if lay.cls is not None:
    cls = t.param(lay.cls, normal, (c,) if lay.flat_tokens else (1, 1, c), token_axes)
    tokens.append(jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c)))
  side, grid = cfg.image_size // p, cfg.pixels // p
  n_pos = side * side + len(tokens)
  if lay.flat_tokens:
    pos = t.param(lay.pos, normal, (n_pos, c), (VOCAB, EMBED))
  else:
    pos = t.param(lay.pos, normal, (1, n_pos, c), (None, None, EMBED))[0]
  pos = pos.astype(jnp.float32)
  if grid != side:
    # transformers resamples the position grid to the input's, in float32.
    if not cfg.interpolation:
      raise InputError(f"this {lay.title} has no position interpolation for a {grid}x{grid} grid")
    m = jnp.asarray(torch_bicubic_matrix(side, grid, cfg.interpolation == "bicubic-antialias"))
    patch = pos[len(tokens):].reshape(side, side, -1)
    patch = jnp.einsum("ai,bj,ijc->abc", m, m, patch, precision=jax.lax.Precision.HIGHEST)
    pos = jnp.concatenate([pos[:len(tokens)], patch.reshape(grid * grid, -1)], axis=0)
  x = jnp.concatenate(tokens + [x], axis=1) + pos.astype(x.dtype)[None]
  if cfg.num_register_tokens:
    reg = t.param(lay.registers, normal, (1, cfg.num_register_tokens, c), (None, None, EMBED))
    n_cls = len(tokens)
    x = jnp.concatenate([x[:, :n_cls], jnp.broadcast_to(reg.astype(x.dtype), (b,) + reg.shape[1:]), x[:, n_cls:]],
                        axis=1)
  return x


class VisionTransformer(nn.Module):
  """pixels NHWC (B, S, S, C), normalised by the family's processor -> (hidden_states, final): see the module doc.

  ``scan_layers``: the layers as one nn.scan (their parameters stacked at ``layout.layers``, models/scan.py).
  """
  config: VisionConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  scan_layers: bool = False

  def __call__(self, pixels: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
    return self.encode(pixels)

  @nn.compact
  def encode(self, pixels: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """(hidden_states, final), whatever ``__call__`` returns in a subclass."""
    cfg, t = self.config, Tree(self)
    lay, eps = cfg.layout, cfg.layer_norm_eps
    x = _embed(t, cfg, self.dtype, pixels)
    if lay.pre_norm is not None:
      x = t.layer_norm(lay.pre_norm, eps, x, self.dtype)
    kw = dict(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, heads=cfg.num_attention_heads,
              act=cfg.hidden_act, eps=eps, names=lay.block, qkv_bias=cfg.qkv_bias, dtype=self.dtype,
              attention_impl=self.attention_impl)
    states = t.at(lay.layers[:-1], lambda m, x: layer_stack(Block, kw, cfg.num_hidden_layers, x,
                                                             scan=self.scan_layers, name=lay.layers[-1]), x)
    last = states[-1][:, 0] if lay.pool_cls else states[-1]
    return states, t.layer_norm(lay.final_norm, eps, last, self.dtype)

  def param_shapes(self) -> Params:
    """The parameter tree as boxed ShapeDtypeStructs (nothing is allocated)."""
    cfg = self.config
    pixels = jax.ShapeDtypeStruct((1, cfg.pixels, cfg.pixels, cfg.num_channels), jnp.float32)
    return jax.eval_shape(lambda x: self.init(jax.random.key(0), x), pixels)["params"]


# ---------------------------------------------------------------------------------------------------------------
# DINO v1: transformers' ViTModel
# ---------------------------------------------------------------------------------------------------------------

VIT_LAYOUT = Layout(family="vit", title="ViT", block=VIT_BLOCK, patch=("embeddings", "patch_embeddings", "projection"),
                    patch_bias=True, pos=("embeddings", "position_embeddings"), cls=("embeddings", "cls_token"),
                    layers=("encoder", "layer"), final_norm=("layernorm",))


@dataclasses.dataclass(frozen=True)
class ViTConfig(VisionConfig):
  """The fields of transformers' ViTConfig that shape the model; defaults are facebook/dino-vits16's."""
  layout: ClassVar[Layout] = VIT_LAYOUT
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 384
  intermediate_size: int = 1536
  num_hidden_layers: int = 12
  num_attention_heads: int = 6
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True

  @classmethod
  def from_transformers(cls, cfg: dict) -> "ViTConfig":
    """From a ViTConfig json dict (config.json of a ViTModel checkpoint)."""
    if cfg.get("model_type") not in (None, "vit", "dino"):
      raise InputError(f"DINO model config: model_type {cfg.get('model_type')!r} is not a plain ViT ('vit')")
    names = {f.name for f in dataclasses.fields(cls)}
    # transformers' own defaults where the json leaves a field out (older files omit qkv_bias, layer_norm_eps...).
    kwargs = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "qkv_bias": True}
    kwargs.update({k: v for k, v in cfg.items() if k in names})
    layers.activation(kwargs["hidden_act"])  # fail early on an unknown activation
    return cls(**kwargs)


class ViTModel(VisionTransformer):
  """DINO's ViT: pre-norm blocks, exact GELU, no pooler; the DINO feature is the final-layernormed class token (what
  torch.hub's ``dino_vits16`` returns, and ``ViTModel(...).last_hidden_state[:, 0]``)."""

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """(B, 1 + patches, hidden): last_hidden_state, final layer norm applied (as transformers' ViTModel)."""
    return self.encode(pixels)[1]

  def cls_features(self, pixels: jax.Array) -> jax.Array:
    """(B, hidden): the layer-normed CLS token, DINO's image feature."""
    return self.encode(pixels)[1][:, 0]
