"""Per-host training batches from prepared TFDS records, with grain: shuffled, sharded, augmented, resumable.

The sample stream is a pure function of the seed, the same whatever the number of hosts:

- Global slot t = 0, 1, 2, ... (infinite): sample t of the whole run. Its record is position t of the epoch-wise
  shuffle (epoch ``t // N`` is a permutation of the N records drawn by grain's index shuffle with a per-epoch seed,
  so every epoch has another order), and its augmentation draws from ``np.random.default_rng([seed, t])``: neither
  depends on worker, thread or host count.
- Step s takes slots ``[s * B, (s + 1) * B)`` for a global batch B, laid out as ``micro_batches`` micro-batches of
  ``B / micro_batches`` consecutive slots. Host ``h`` of ``P`` reads, of each micro-batch, the h-th of P equal
  contiguous parts, so concatenating the hosts' batches in process order gives exactly the single-host batch: a run
  on P hosts computes what a run on one host does (and resumes onto another host count). Hosts never overlap and
  together read everything; only the records of a host's slots are read (random access through
  ``tfds.data_source``).
- A record that fails to read, decode or transform is skipped (logged, counted in ``Loader.skipped``) and its slot
  takes a substitute record drawn from ``[seed, t, attempt]``: the rest of the stream does not move. No sample of
  zeros is ever made (the official loader returns zeros).

Batches are dicts of numpy arrays with a leading per-host batch axis; see ``augment`` for the keys, plus ``record``
(int32, the record's index in the split, for tracing). The state is JSON (``Loader.get_state``):

  {"format": "elite_jax.loader/2", "slots": t, "skipped": n, "seed": s, "num_records": N, "stage": 1|2}

``slots`` is the number of global slots consumed (the next batch starts at slot t); ``skipped`` this host's count
(the training loop stores the sum over hosts); the rest identifies the stream, and ``set_state`` refuses a state of
another stream. Worker and thread counts, the batch size and the host count may change across a restore.
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
_ENDLESS = 2 ** 62  # the per-host sample stream is infinite (epochs repeat)

STATE_FORMAT = "elite_jax.loader/2"
MAX_CONSECUTIVE_SKIPS = 1000  # records failing in a row for one slot: then the data is broken, not a record


@dataclasses.dataclass(frozen=True)
class Layout:
  """Which global slot each of a host's samples is (see the module docstring)."""

  batch_size: int  # per host
  micro_batches: int
  process_index: int
  process_count: int
  start: int = 0  # the first slot of this stream (a restored state's ``slots``)

  def slot(self, i: int) -> int:
    """The global slot of this host's i-th sample."""
    step, r = divmod(i, self.batch_size)
    m = self.batch_size // self.micro_batches  # this host's part of a micro-batch
    micro, j = divmod(r, m)
    global_batch = self.batch_size * self.process_count
    return self.start + step * global_batch + micro * m * self.process_count + self.process_index * m + j


@dataclasses.dataclass(frozen=True)
class Sample:
  """A slot's example and the records that failed before it (the loader logs and counts them)."""

  example: dict[str, np.ndarray]
  failures: tuple[tuple[int, str], ...]


class SampleFn:
  """grain ``map`` function: this host's sample index -> ``Sample`` of its global slot.

  A plain picklable object, so that grain's worker processes can run it.
  """

  def __init__(self, source, order, layout: Layout, stage: int, prompts: augment.Prompts, resolution: int,
               seed: int):
    self.source, self.order, self.layout = source, order, layout
    self.stage, self.prompts, self.resolution, self.seed = stage, prompts, resolution, seed

  def __call__(self, i: int) -> Sample:
    slot = self.layout.slot(int(i))
    record_index = int(self.order[slot])
    failures = []
    for attempt in range(MAX_CONSECUTIVE_SKIPS):
      try:
        return Sample(self._example(slot, attempt, record_index), tuple(failures))
      except Exception as e:  # noqa: BLE001 - any failure of one record must not stop training
        failures.append((record_index, f"{type(e).__name__}: {e}"))
        # the substitute depends on the slot alone, so the other slots (and hosts) are untouched
        record_index = int(np.random.default_rng([self.seed, slot, attempt + 1, 0x5B]).integers(len(self.source)))
    raise RuntimeError(f"{len(failures)} records in a row failed (last: record {failures[-1][0]}: "
                       f"{failures[-1][1]}); the data or the loader configuration is broken")

  def _example(self, slot: int, attempt: int, record_index: int) -> dict[str, np.ndarray]:
    record = self.source[record_index]
    rng = np.random.default_rng([self.seed, slot] if attempt == 0 else [self.seed, slot, attempt])
    crop = records.decode_png(record["image"], 3)
    if self.stage == 1:
      example = augment.stage1_example(crop, rng, self.prompts, self.resolution)
    else:
      mask = records.decode_png(record["mask"], 1)
      if mask.shape != crop.shape[:2]:
        raise ValueError(f"mask {mask.shape} and image {crop.shape[:2]} differ in size")
      example = augment.stage2_example(crop, mask, record["box"], rng, self.prompts, self.resolution)
    example["record"] = np.int32(record_index)
    return example


class Loader:
  """Iterator of per-host batches with ``get_state`` / ``set_state`` (see the module docstring)."""

  def __init__(self, source, sample_fn: SampleFn, *, seed: int, worker_count: int, read_threads: int):
    self._sample_fn = sample_fn
    self.seed = seed
    self._worker_count, self._read_threads = worker_count, read_threads
    self.num_records = len(source)
    self.position = 0  # this host's samples consumed since the layout's start slot
    self.skipped = 0  # records this host skipped (restored with the state on process 0)
    self._iterator = None

  @property
  def layout(self) -> Layout:
    return self._sample_fn.layout

  @property
  def batch_size(self) -> int:
    return self.layout.batch_size

  # -- the stream ------------------------------------------------------------------------------------------------------

  def _start(self) -> None:
    self.close()
    ds = grain.MapDataset.range(self.position, _ENDLESS).map(self._sample_fn)
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
    examples = []
    for _ in range(self.batch_size):
      sample = next(self._iterator)
      self.position += 1
      for record, error in sample.failures:
        self.skipped += 1
        log.warning("skipping record %d: %s [%d skipped so far on this host]", record, error, self.skipped)
      examples.append(sample.example)
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
    return {"seed": self.seed, "num_records": self.num_records, "stage": self._sample_fn.stage}

  def get_state(self) -> dict:
    """JSON-serialisable position of the stream (see the module docstring); taken between batches."""
    layout = self.layout
    slots = layout.start + (self.position // layout.batch_size) * layout.batch_size * layout.process_count
    return {"format": STATE_FORMAT, "slots": slots, "skipped": self.skipped, **self._identity()}

  def set_state(self, state: dict) -> None:
    """Resumes exactly where ``get_state`` was taken (the next batch is the one that would have followed), on this
    host's part of the stream; the count of skipped records goes to process 0."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
      raise InputError(f"not a loader state of format {STATE_FORMAT!r}: {state!r}")
    differ = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
    if differ:
      raise InputError("the loader state is of another data stream: "
                       + ", ".join(f"{k} {a!r} (state) vs {b!r} (loader)" for k, (a, b) in differ.items()))
    self.close()
    fn = self._sample_fn
    self._sample_fn = SampleFn(fn.source, fn.order, dataclasses.replace(fn.layout, start=int(state["slots"])),
                               fn.stage, fn.prompts, fn.resolution, fn.seed)
    self.position = 0
    self.skipped = int(state["skipped"]) if fn.layout.process_index == 0 else 0


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
    micro_batches: int = 1,
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
    batch_size: examples per batch on this host (the global batch is ``batch_size * process_count``).
    stage: 1 or 2; by default the dataset's config (``stage1``/``stage2``), which it must match.
    resolution: side of ``pixel_values`` (512 officially), a multiple of 8.
    seed: the stream's seed (order and augmentation).
    placeholder, placeholder_index: the concept word and where its index comes from, "whitespace" (official) or
      "token" (see ``augment.make_prompts``).
    micro_batches: how many micro-batches (gradient accumulation) a batch is cut into; it must divide
      ``batch_size``. It decides which slots each host reads, so that every host count gives the same global batch.
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
  if not isinstance(micro_batches, int) or micro_batches < 1 or batch_size % micro_batches:
    raise InputError(f"micro_batches must be a positive divisor of the batch size {batch_size}, got {micro_batches!r}")
  if worker_count < 0 or read_threads < 1:
    raise InputError(f"worker_count must be >= 0 and read_threads >= 1, got {worker_count}, {read_threads}")
  decoders = {k: tfds.decode.SkipDecoding() for k in ("image", "mask") if k in builder.info.features}
  source = builder.as_data_source(split=split, decoders=decoders)
  if len(source) == 0:
    raise InputError(f"the dataset {builder.name}/{builder.builder_config.name} ({split}) has no examples")
  prompts = augment.make_prompts(tokenizer, stage, placeholder, placeholder_index)
  # grain's shuffle seeds epoch e with seed + e; hash the user seed first so that seeds s and s+1 do not share
  # their permutations one epoch apart.
  shuffle_seed = int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])
  order = grain.MapDataset.range(len(source)).shuffle(seed=shuffle_seed).repeat(None)
  layout = Layout(batch_size, micro_batches, process_index, process_count)
  sample_fn = SampleFn(source, order, layout, stage, prompts, resolution, seed)
  return Loader(source, sample_fn, seed=seed, worker_count=worker_count, read_threads=read_threads)


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
