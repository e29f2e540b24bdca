"""Stage 2 (local mapper), the official recipe: the stage-1 mapper frozen, OpenImages masks, 512 px, float32,
batch 32 (2 per GPU x 4 GPUs x 4 accumulation), lr 1e-5 x 32, reg 1e-4 on to_v_local(e), 65k steps.

  python train.py --config configs/stage2_local.py --workdir runs/stage2 \
    --config.data.manual_dir=/data/open_images --config.global_mapper=runs/stage1/global_mapper.safetensors
"""

from elite_jax.train.config import defaults


def get_config():
  c = defaults()
  c.stage = 2
  c.batch_size = 32
  c.grad_accum = 4
  c.learning_rate = 1e-5
  c.reg_weight = 1e-4
  c.num_train_steps = 65_000
  return c
