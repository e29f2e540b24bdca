"""The Flax models, which know nothing of files, training or data: ``layers`` (layers with logical axis names),
``attention`` (the attention kernels by name), ``elite_attention`` (the UNet's transformer blocks with ELITE's
cross-attention), ``unet``, ``vae``, ``clip`` (text and vision towers), ``vit`` (DINO's ViT), ``mappers`` (ELITE's
global and local mappers) and ``presets`` (the real models' configs)."""
