"""Weights from and to files: PyTorch checkpoints without torch, their conversion to Flax trees, pretrained models
and the hub, and ELITE's mapper files.

- ``torch_files``: ``.pt``/``.bin``/``.safetensors`` as numpy arrays (a restricted unpickler), and ``.pt`` writing.
- ``convert``: PyTorch state dicts -> Flax parameter trees, checked against a module's shapes.
- ``pretrained``: diffusers component folders, CLIP and DINO checkpoints, hub downloads.
- ``mapper_files``: ELITE mappers in the official ``.pt`` layout and our ``.safetensors`` (with metadata).
"""
