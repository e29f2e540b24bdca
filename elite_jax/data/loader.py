"""Per-host training batches from prepared TFDS records, with grain: shuffled, sharded, augmented, resumable.

The sample stream is a pure function of the seed:

- Global position g = 0, 1, 2, ... (infinite). Epoch ``g // N`` is a permutation of the N records drawn by grain's
  index shuffle with a per-epoch seed, so every epoch has another order.
- Host ``h`` of ``P`` reads the positions ``g = h + P * i`` (i = 0, 1, ...): hosts never overlap and together read
  everything. Only the records at those positions are read (random access through ``tfds.data_source``).
- Sample ``g``'s augmentation draws from ``np.random.default_rng([seed, g])``, so it does not depend on worker count,
  thread count or host count.
- A record that fails to read, decode or transform is skipped (logged, counted in ``Loader.skipped``); its batch is
  filled from the following positions. No sample of zeros is ever made (the official loader returns zeros).

Batches are dicts of numpy arrays with a leading per-host batch axis; see ``augment`` for the keys, plus ``record``
(int32, the record's index in the split, for tracing). The state is JSON (``Loader.get_state``):

  {"format": "elite_jax.loader/1", "position": i, "skipped": n,
   "seed": s, "process_index": h, "process_count": P, "num_records": N, "stage": 1|2}

``position`` is the number of this host's positions consumed (batches and skipped records); the rest identifies the
stream, and ``set_state`` refuses a state of another stream. Worker and thread counts and the batch size may change
across a restore.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import grain
from absl import flags
import numpy as np
import tensorflow_datasets as tfds

from elite_jax.data import augment, records
from elite_jax.data.folder import ConceptFolder  # noqa: F401 - registers the builder with TFDS
from elite_jax.data.openimages import OpenImagesElite  # noqa: F401 - registers the builder with TFDS
from elite_jax.errors import InputError

log = logging.getLogger("elite_jax.data")

STATE_FORMAT = "elite_jax.loader/1"
MAX_CONSECUTIVE_SKIPS = 1000  # then the data is broken, not a record: raise rather than spin


@dataclasses.dataclass(frozen=True)
class Skipped:
  """What a failed sample becomes in the stream (the loader drops and counts it)."""

  record: int
  position: int
  error: str


class SampleFn:
  """grain ``map_with_index`` function: (global position, record index) -> example dict or ``Skipped``.

  A plain picklable object, so that grain's worker processes can run it.
  """

  def __init__(self, source, stage: int, prompts: augment.Prompts, resolution: int, seed: int):
    self.source, self.stage, self.prompts, self.resolution, self.seed = source, stage, prompts, resolution, seed

  def __call__(self, position: int, record_index: int) -> dict[str, np.ndarray] | Skipped:
    try:
      record = self.source[int(record_index)]
      rng = np.random.default_rng([self.seed, int(position)])
      crop = records.decode_png(record["image"], 3)
      if self.stage == 1:
        example = augment.stage1_example(crop, rng, self.prompts, self.resolution)
      else:
        mask = records.decode_png(record["mask"], 1)
        if mask.shape != crop.shape[:2]:
          raise ValueError(f"mask {mask.shape} and image {crop.shape[:2]} differ in size")
        example = augment.stage2_example(crop, mask, record["box"], rng, self.prompts, self.resolution)
    except Exception as e:  # noqa: BLE001 - any failure of one record must not stop training
      return Skipped(int(record_index), int(position), f"{type(e).__name__}: {e}")
    example["record"] = np.int32(record_index)
    return example


class Loader:
  """Iterator of per-host batches with ``get_state`` / ``set_state`` (see the module docstring)."""

  def __init__(self, source, sample_fn: SampleFn, *, batch_size: int, seed: int, process_index: int,
               process_count: int, worker_count: int, read_threads: int):
    self._sample_fn = sample_fn
    self.batch_size, self.seed = batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self._worker_count, self._read_threads = worker_count, read_threads
    self.num_records = len(source)
    self.position = 0  # this host's positions consumed
    self.skipped = 0  # records skipped since the start of training (restored with the state)
    self._iterator = None

  # -- the stream ------------------------------------------------------------------------------------------------------

  def _dataset(self) -> grain.MapDataset:
    # grain's shuffle seeds epoch e with seed + e; hash the user seed first so that seeds s and s+1 do not share
    # their permutations one epoch apart.
    shuffle_seed = int(np.random.SeedSequence([self.seed, 0x5EED]).generate_state(1)[0])
    ds = grain.MapDataset.range(self.num_records).shuffle(seed=shuffle_seed).repeat(None)
    ds = ds.map_with_index(self._sample_fn)  # the index here is the global position g
    return ds[self.process_index::self.process_count]

  def _start(self) -> None:
    self.close()
    ds = self._dataset()[self.position:]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._read_threads,
                                              prefetch_buffer_size=max(2 * self.batch_size, self._read_threads)))
    if self._worker_count > 0:
      _absl_flags_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
    self._iterator = iter(it)

  # -- iteration -------------------------------------------------------------------------------------------------------

  def __iter__(self) -> Loader:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._start()
    examples, consecutive = [], 0
    while len(examples) < self.batch_size:
      item = next(self._iterator)
      self.position += 1
      if isinstance(item, Skipped):
        self.skipped += 1
        consecutive += 1
        log.warning("skipping record %d (position %d): %s [%d skipped so far]", item.record, item.position,
                    item.error, self.skipped)
        if consecutive >= MAX_CONSECUTIVE_SKIPS:
          raise RuntimeError(f"{consecutive} records in a row failed (last: record {item.record}: {item.error}); "
                             f"the data or the loader configuration is broken")
        continue
      consecutive = 0
      examples.append(item)
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def close(self) -> None:
    """Stops the prefetch threads / worker processes (iteration restarts them)."""
    if self._iterator is not None:
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()
      self._iterator = None

  def __enter__(self) -> Loader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- checkpointing ---------------------------------------------------------------------------------------------------

  def _identity(self) -> dict:
    return {"seed": self.seed, "process_index": self.process_index, "process_count": self.process_count,
            "num_records": self.num_records, "stage": self._sample_fn.stage}

  def get_state(self) -> dict:
    """JSON-serialisable position of the stream (see the module docstring)."""
    return {"format": STATE_FORMAT, "position": self.position, "skipped": self.skipped, **self._identity()}

  def set_state(self, state: dict) -> None:
    """Resumes exactly where ``get_state`` was taken (the next batch is the one that would have followed)."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
      raise InputError(f"not a loader state of format {STATE_FORMAT!r}: {state!r}")
    differ = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
    if differ:
      raise InputError("the loader state is of another data stream: "
                       + ", ".join(f"{k} {a!r} (state) vs {b!r} (loader)" for k, (a, b) in differ.items()))
    self.position, self.skipped = int(state["position"]), int(state["skipped"])
    self.close()


def make_loader(
    dataset: tfds.core.DatasetBuilder | str,
    *,
    tokenizer,
    batch_size: int,
    data_dir: str | os.PathLike | None = None,
    stage: int | None = None,
    resolution: int = 512,
    seed: int = 0,
    placeholder: str = "S",
    placeholder_index: str = "whitespace",
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 4,
    split: str = "train",
) -> Loader:
  """An infinite iterator of per-host batches of a prepared dataset.

  Args:
    dataset: a prepared builder (``openimages.build``, ``folder.build``) or its name, e.g.
      ``"open_images_elite/stage2"``, read from ``data_dir``.
    tokenizer: the CLIP tokenizer (used once, here, for the 27 templates x captions).
    batch_size: examples per batch on this host.
    stage: 1 or 2; by default the dataset's config (``stage1``/``stage2``), which it must match.
    resolution: side of ``pixel_values`` (512 officially), a multiple of 8.
    seed: the stream's seed (order and augmentation).
    placeholder, placeholder_index: the concept word and where its index comes from, "whitespace" (official) or
      "token" (see ``augment.make_prompts``).
    process_index, process_count: this host's shard; default ``jax.process_index()`` / ``jax.process_count()``.
    worker_count: grain worker processes (0: threads in this process only).
    read_threads: grain threads reading and transforming records (per process).
  """
  builder = _builder(dataset, data_dir)
  config_stage = int(builder.builder_config.name[-1]) if builder.builder_config is not None else None
  if stage is None:
    stage = config_stage
  if stage not in (1, 2) or (config_stage is not None and stage != config_stage):
    raise InputError(f"stage {stage!r} does not fit the dataset {builder.name}/{builder.builder_config.name}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
  if not isinstance(resolution, int) or resolution < 8 or resolution % 8:
    raise InputError(f"resolution must be a positive multiple of 8 (the VAE's factor), got {resolution!r}")
  if not isinstance(seed, int) or seed < 0:
    raise InputError(f"seed must be a non-negative integer, got {seed!r}")
  if process_index is None or process_count is None:
    import jax  # only for the defaults: the data pipeline itself needs no JAX
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise InputError(f"process_index {process_index} is not in [0, process_count={process_count})")
  if worker_count < 0 or read_threads < 1:
    raise InputError(f"worker_count must be >= 0 and read_threads >= 1, got {worker_count}, {read_threads}")
  decoders = {k: tfds.decode.SkipDecoding() for k in ("image", "mask") if k in builder.info.features}
  source = builder.as_data_source(split=split, decoders=decoders)
  if len(source) == 0:
    raise InputError(f"the dataset {builder.name}/{builder.builder_config.name} ({split}) has no examples")
  prompts = augment.make_prompts(tokenizer, stage, placeholder, placeholder_index)
  sample_fn = SampleFn(source, stage, prompts, resolution, seed)
  return Loader(source, sample_fn, batch_size=batch_size, seed=seed, process_index=process_index,
                process_count=process_count, worker_count=worker_count, read_threads=read_threads)


def _builder(dataset: tfds.core.DatasetBuilder | str, data_dir: str | os.PathLike | None) -> tfds.core.DatasetBuilder:
  if isinstance(dataset, tfds.core.DatasetBuilder):
    builder = dataset
  else:
    try:
      builder = tfds.builder(dataset, data_dir=None if data_dir is None else os.fspath(data_dir))
    except Exception as e:  # noqa: BLE001 - TFDS raises several types for unknown names
      raise InputError(f"no dataset {dataset!r} in {data_dir}: {e}") from None
  if not builder.is_prepared():
    raise InputError(f"the dataset {builder.name}/{builder.builder_config.name} is not prepared in "
                     f"{builder.data_dir} (build it first with elite_jax.data.prepare)")
  return builder


def _absl_flags_parsed() -> None:
  # grain's worker processes read absl flags, which are unparsed outside absl.app.run (e.g. under pytest).
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
