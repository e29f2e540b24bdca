"""A real-size study (README "Research"): which encoder, how wide a mapper, which taps, on the same OpenImages data.

CLIP ViT-L/14 (ELITE's), OpenCLIP ViT-H/14 and DINOv2-L/14 (with registers) x mapper width 512 / 1024 x taps "elite"
/ "spread", stage 1, 2000 steps of batch 64 at 512 px each, held-out loss on 4 fixed batches every 500 steps.

  elite-sweep --config configs/sweep_encoders.py --workdir runs/sweep_encoders \
    --config.base.data.manual_dir=/data/open_images --config.base.validation.manual_dir=/data/open_images_val

The encoder folders are transformers checkpoints (CLIPVisionModel / Dinov2WithRegistersModel); OpenCLIP's H/14 in
CLIPVisionModel layout is e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K (a CLIPModel: its vision tower is read).
"""

import ml_collections

from elite_jax.train.config import defaults


def get_config():
  s = ml_collections.ConfigDict()
  base = defaults()
  base.stage = 1
  base.num_train_steps = 2000
  base.checkpoint_every = 500
  base.log_every = 50
  base.scan_image_encoder = True
  base.validation.every = 500
  base.validation.batches = 4
  s.base = base
  s.grid = (("image_encoder", ("openai/clip-vit-large-patch14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                               "facebook/dinov2-with-registers-large")),
            ("mapper.hidden_dim", (512, 1024)), ("taps", ("elite", "spread")))
  s.eval_steps = (500, 1000, 2000)
  return s
