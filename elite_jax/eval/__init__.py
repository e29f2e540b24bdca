"""DreamBench evaluation: ``metrics`` (CLIP-T, CLIP-I, DINO-I: the metric models, their preprocessing, the scores),
``dreambench`` (the benchmark folder, resumable generation, scoring, ``evaluate``), ``report`` (results files and
image grids). The command is ``elite-evaluate`` (elite_jax/cli/evaluate.py)."""
