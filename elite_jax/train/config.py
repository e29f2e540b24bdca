"""The training config schema: every key with its default (the official stage-1 recipe) and its checks.

Config files under configs/ start from ``defaults()`` and set what their recipe changes; ``validate`` turns a wrong
value into an InputError that names the key, before anything is loaded.
"""

from __future__ import annotations

import os

import ml_collections

from elite_jax.errors import InputError
from elite_jax.models.attention import IMPLEMENTATIONS
from elite_jax.types import DTYPES

STAGES = (1, 2)
MATMUL_PRECISIONS = ("highest", "high", "default")


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 1
  # Models: a diffusers SD folder or hub id ("random-tiny": RANDOM in-memory tiny models, for tests/first runs).
  c.pretrained = "CompVis/stable-diffusion-v1-4"
  # The image encoder the mappers read: a transformers CLIPVisionModel / CLIPModel (any size: OpenAI L/14, OpenCLIP
  # H/14 and bigG/14 in that layout), Dinov2Model / Dinov2WithRegistersModel or SiglipVisionModel / SiglipModel
  # folder or hub id; "random-tiny-{clip,dinov2,siglip}" with pretrained "random-tiny" (RANDOM weights).
  c.image_encoder = "openai/clip-vit-large-patch14"
  c.scan_image_encoder = False  # its layers as one nn.scan (compiles in seconds at any depth; same numbers)
  c.global_mapper = ""  # stage 2: the stage-1 mapper (.safetensors export or official .pt)
  # Warm starts (the official --global_mapper_path / --local_mapper_path): the trained mapper's MLPs and K/V start
  # from this file (official .pt or our .safetensors) instead of PyTorch's init and SD's K/V.
  c.init_global_mapper = ""  # stage 1
  c.init_local_mapper = ""  # stage 2
  # tapped_layers: the encoder hidden state each word reads (word 0 first). () takes the encoder's default, ELITE's
  # spacing at its depth (encoders.default_taps: the last layer, then 1/6..4/6 of the way up): CLIP L/14 (24, 4, 8,
  # 12, 16), OpenCLIP H/14 (32, 5, 11, 16, 21), bigG/14 (48, 8, 16, 24, 32), DINOv2-B and SigLIP-B (12, 2, 4, 6, 8).
  c.mapper = ml_collections.ConfigDict(dict(hidden_dim=1024, depth=2, tapped_layers=(24, 4, 8, 12, 16)))

  c.data = ml_collections.ConfigDict(dict(
      builder="openimages",  # "openimages" (manual_dir = an OpenImages V6 download) or "folder" (your photos)
      manual_dir="",  # OpenImages root, or the folder of concept photos (+ NAME_mask.png)
      data_dir="",  # where TFDS writes the built array_record files (default: WORKDIR/tfds)
      resolution=512, placeholder="S",
      placeholder_index="whitespace",  # official quirk; "token" fixes it (spec 2.2)
      workers=0))

  # Optimisation, as train_global.sh: lr 1e-6 x 64 (scale_lr), AdamW, clip 1, constant schedule.
  c.batch_size = 64  # samples per optimizer update, all devices and accumulation steps together
  c.grad_accum = 4
  c.learning_rate = 1e-6
  c.scale_lr = True
  c.warmup_steps = 0
  c.adam_b1, c.adam_b2, c.adam_eps, c.weight_decay = 0.9, 0.999, 1e-8, 1e-2
  c.max_grad_norm = 1.0
  c.reg_weight = 0.01
  c.num_train_steps = 70_000
  c.seed = 0

  # Official quirks, reproduced by default (spec 11).
  c.quirks = ml_collections.ConfigDict(dict(
      # stage 2: how many consecutive samples share one w0-map max. The official code takes it over its per-GPU
      # batch of 2 (train_local.py:120); 1 is per sample (the fix). Independent of the mesh; it must divide the
      # per-device micro-batch.
      w0_max_group=2,
      stage2_loss_sum_channels=True,  # stage 2: 4x the per-element masked MSE (False: the mean)
  ))

  # Scale and precision.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.shard_frozen = False  # False: frozen SD/CLIP replicated; True: sharded by the rules table (fsdp/tensor)
  c.frozen_dtype = "float32"  # the official recipe is float32 throughout; bfloat16 halves frozen memory
  c.compute_dtype = "float32"
  c.remat = False
  c.attention_impl = "auto"  # the attention kernel (elite_jax/models/attention.py): auto, xla, cudnn, cpu, pallas
  # Matmul precision in the train step. "highest": float32 matmuls are true float32 on GPUs and TPUs (their default
  # takes TF32 / bfloat16 passes), as the official V100 run; "default" trades that for speed. XLA:CPU computes
  # float32 in full either way.
  c.matmul_precision = "highest"
  c.memory_limit_gb = 0.0  # stop before training if the compiled step needs more per device (0: the device's own)

  # Several hosts (TPU pods, multi-node GPU, elite-launch): every host runs the same command.
  c.multihost = False  # join the other processes (elite_jax/train/hosts.py)
  c.distributed = ml_collections.ConfigDict(dict(
      heartbeat_timeout=100,  # s: JAX's runtime aborts the other hosts this long after one died
      peer_timeout=60,  # s: our watchdog stops them sooner, with one line and exit code 3
  ))

  # Checkpoints and logs.
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.async_checkpoint = True
  c.log_every = 50
  c.export_every = 0  # also export the mapper to WORKDIR/mappers/ every this many steps (0: only at the end)
  c.export_official = False  # those exports in the official .pt layout too

  # A held-out validation loss (elite_jax/train/validation.py): every N steps, the objective on fixed batches
  # (from manual_dir, same builder as the training data; "": fixed batches of the training data) with fixed noise
  # and timesteps -> val_loss / val_loss_mle in metrics.jsonl and TensorBoard.
  c.validation = ml_collections.ConfigDict(dict(every=0, batches=2, manual_dir="", data_dir="", seed=1234))

  # Sample images during training (the official code samples every 200 steps): a fixed photo, prompts and initial
  # latents -> WORKDIR/samples/step_N.png and TensorBoard.
  c.samples = ml_collections.ConfigDict(dict(
      every=0,  # steps; 0: never
      image="", mask="",  # the concept photo and its (optional) mask
      prompts=("a photo of a S", "a S on the beach"),
      steps=20, scheduler="ddim", guidance=5.0, lam=0.8, seed=0))
  return c


def tiny(c: ml_collections.ConfigDict, photos: str) -> ml_collections.ConfigDict:
  """The CPU first-run settings of configs/tiny_stage*.py: RANDOM tiny models, a folder of photos, 64 px, 20 steps."""
  c.pretrained = "random-tiny"
  c.mapper.hidden_dim = 32
  c.data.builder = "folder"
  c.data.manual_dir = photos
  c.data.resolution = 64
  c.batch_size = 2
  c.grad_accum = 1
  c.learning_rate = 1e-4
  c.scale_lr = False
  c.num_train_steps = 20
  c.checkpoint_every = 10
  c.log_every = 1
  c.samples.image = os.path.join(photos, "00.jpg") if os.path.isfile(os.path.join(photos, "00.jpg")) else ""
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  def need(ok: bool, key: str, why: str) -> None:
    if not ok:
      raise InputError(f"config.{key}={_value(c, key)!r}: {why}")
  need(c.stage in STAGES, "stage", "must be 1 or 2")
  need(c.batch_size >= 1, "batch_size", "must be >= 1")
  need(c.grad_accum >= 1 and c.batch_size % c.grad_accum == 0, "grad_accum", "must divide batch_size")
  need(c.learning_rate > 0, "learning_rate", "must be > 0")
  need(c.warmup_steps >= 0, "warmup_steps", "must be >= 0")
  need(0 <= c.adam_b1 < 1 and 0 <= c.adam_b2 < 1, "adam_b1", "betas must be in [0, 1)")
  need(c.max_grad_norm > 0, "max_grad_norm", "must be > 0")
  need(c.reg_weight >= 0, "reg_weight", "must be >= 0")
  need(c.num_train_steps >= 1, "num_train_steps", "must be >= 1")
  need(c.mapper.hidden_dim >= 1, "mapper.hidden_dim", "must be >= 1")
  need(c.mapper.depth >= 0, "mapper.depth", "must be >= 0")
  need(not c.mapper.tapped_layers or min(c.mapper.tapped_layers) >= 0, "mapper.tapped_layers",
       "must list image-encoder layer indices >= 0 (the first is word w0's), or be () for the encoder's default")
  need(c.data.builder in ("openimages", "folder"), "data.builder", "must be 'openimages' or 'folder'")
  need(c.data.resolution >= 64 and c.data.resolution % 64 == 0, "data.resolution", "must be a multiple of 64")
  need(c.data.placeholder_index in ("whitespace", "token"), "data.placeholder_index", "'whitespace' or 'token'")
  need(c.data.workers >= 0, "data.workers", "must be >= 0")
  need(c.frozen_dtype in DTYPES, "frozen_dtype", f"one of {tuple(DTYPES)}")
  need(c.compute_dtype in DTYPES, "compute_dtype", f"one of {tuple(DTYPES)}")
  need(c.attention_impl in IMPLEMENTATIONS, "attention_impl", f"one of {IMPLEMENTATIONS}")
  need(c.matmul_precision in MATMUL_PRECISIONS, "matmul_precision", f"one of {MATMUL_PRECISIONS}")
  need(c.memory_limit_gb >= 0, "memory_limit_gb", "must be >= 0 (0: the device's own)")
  need(c.quirks.w0_max_group >= 1, "quirks.w0_max_group", "must be >= 1 (1: per sample)")
  need(c.distributed.peer_timeout > 0 and c.distributed.heartbeat_timeout > c.distributed.peer_timeout,
       "distributed.peer_timeout", "must be > 0 and below distributed.heartbeat_timeout (so that it acts first)")
  need(c.export_every >= 0, "export_every", "must be >= 0")
  need(c.samples.every >= 0, "samples.every", "must be >= 0")
  need(c.validation.every >= 0, "validation.every", "must be >= 0 (0: never)")
  need(c.validation.batches >= 1, "validation.batches", "must be >= 1")
  need(not c.samples.every or bool(c.samples.image), "samples.image", "samples.every needs a concept photo")
  need(not c.samples.every or len(c.samples.prompts) >= 1, "samples.prompts", "samples.every needs prompts")
  need(not c.init_local_mapper or c.stage == 2, "init_local_mapper", "is a stage-2 setting")
  need(not c.init_global_mapper or c.stage == 1, "init_global_mapper", "is a stage-1 setting (stage 2 freezes "
                                                                      "config.global_mapper)")
  need(c.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
  need(c.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
  need(c.log_every >= 1, "log_every", "must be >= 1")
  for axis in ("data", "fsdp", "tensor"):
    need(c.mesh[axis] == -1 or c.mesh[axis] >= 1, f"mesh.{axis}", "must be >= 1 or -1")
  need(c.stage == 1 or bool(c.global_mapper), "global_mapper", "stage 2 needs the stage-1 mapper file")
  need(c.data.builder != "folder" or bool(c.data.manual_dir), "data.manual_dir", "the folder of concept photos")


def _value(c, dotted):
  for part in dotted.split("."):
    c = c[part]
  return c
