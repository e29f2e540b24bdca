"""Stage 1 (global mapper), the official recipe: SD v1-4, CLIP ViT-L/14, OpenImages boxes, 512 px, float32,
batch 64 (4 per GPU x 4 GPUs x 4 accumulation), lr 1e-6 x 64, 70k steps (issue 4 of the official repo).

  python train.py --config configs/stage1_global.py --workdir runs/stage1 \
    --config.data.manual_dir=/data/open_images
"""

from elite_jax.train.config import defaults


def get_config():
  c = defaults()
  c.stage = 1
  return c
