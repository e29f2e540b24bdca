"""The Gradio demo: upload a photo, paint the object (its mask), write prompts that name it S, generate.

    elite-demo --global-mapper checkpoints/global_mapper.pt --local-mapper checkpoints/local_mapper.pt
    elite-demo --random-weights        # offline, tiny random models; the page says RANDOM WEIGHTS

What the official ``app_gradio.py`` offers (photo, brush mask, prompt with S, lambda, seed, guidance, steps), plus
several prompts and images per run, the scheduler, the size, the words injected and the inspection of the concept
(``elite_jax.inspection``). One loaded ``ElitePipeline`` serves every request; a concept is encoded once per photo
and mask (a cache keyed by their content) and reused across prompts and runs; bad input is a message on the page.

``create_app`` builds the page (a ``gr.Blocks``); ``launch`` serves it; ``elite_jax.cli.demo`` parses the flags.
Needs the ``demo`` extra: ``pip install "elite-jax[demo]"``.
"""

from __future__ import annotations

import collections
import contextvars
import hashlib
import html
import random
import time
import warnings
from typing import Any

import gradio as gr
import numpy as np

from elite_jax import inspection, preprocess
from elite_jax.concept import Concept
from elite_jax.errors import InputError
from elite_jax.options import MIN_SIDE, WORDS, GenerationOptions
from elite_jax.schedulers import SAMPLERS
from elite_jax.text import INDEX_MODES

RANDOM_BANNER = ("**RANDOM WEIGHTS**: tiny untrained models built in memory (`--random-weights`); the images are "
                 "noise. This checks the app and the install, offline.")
USAGE = """1. Upload a photo of the concept (object centred).
2. Paint the object with the brush (the mask of the local branch), or upload a mask (white = object), or neither:
   the local branch then sees the whole photo.
3. Write one or more prompts, one a line, that name the concept by **S**: `a photo of a S`, `a S on the beach`.
4. Run. Lambda weighs the local branch (more likeness, less editability)."""
CACHE_SIZE = 8  # concepts kept (a few hundred kB each)
MAX_SIDE, MAX_IMAGES, MAX_STEPS = 1024, 8, 500
# System fonts: the default theme's come from Google Fonts, which an offline machine cannot reach.
THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class ConceptCache:
  """Encoded concepts by the content of their photo and mask (SHA-256), the least recently used dropped first."""

  def __init__(self, size: int = CACHE_SIZE):
    self.size, self.items = size, collections.OrderedDict()
    self.encoded = 0  # how many times a concept had to be encoded

  def get(self, pipe: Any, photo: np.ndarray, mask: np.ndarray | None) -> tuple[Concept, bool]:
    """The concept of (photo, mask), and whether it was cached."""
    h = hashlib.sha256()
    for a in (photo, mask):
      if a is not None:
        h.update(repr((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
      h.update(b"|")
    key = h.hexdigest()
    if key in self.items:
      self.items.move_to_end(key)
      return self.items[key], True
    concept = pipe.encode_concept(photo, mask)
    self.encoded += 1
    self.items[key] = concept
    if len(self.items) > self.size:
      self.items.popitem(last=False)
    return concept, False


def photo_and_drawn_mask(editor: dict | None) -> tuple[np.ndarray, np.ndarray | None]:
  """The photo (H, W, 3) uint8 and the painted mask (H, W) bool (None when nothing is painted) of the editor's value
  (``background`` and ``layers``, RGBA)."""
  if not editor or editor.get("background") is None:
    raise InputError("upload a photo of the concept first")
  bg = np.asarray(editor["background"])
  if bg.ndim == 2:
    bg = np.repeat(bg[..., None], 3, axis=2)
  photo = bg[..., :3].astype(np.uint8)
  if bg.shape[2] == 4 and bg[..., 3].min() < 255:  # transparent parts over white, as gradio flattens them
    a = bg[..., 3:].astype(np.float32) / 255
    photo = np.round(photo * a + 255 * (1 - a)).astype(np.uint8)
  strokes = [np.asarray(layer) for layer in editor.get("layers") or [] if layer is not None]
  painted = [s[..., 3] > 0 for s in strokes if s.ndim == 3 and s.shape[2] == 4]
  mask = np.logical_or.reduce(painted) if painted else None
  if mask is None or not mask.any():
    return photo, None
  if mask.shape != photo.shape[:2]:
    raise InputError(f"the painted mask is {mask.shape[1]}x{mask.shape[0]} but the photo is "
                     f"{photo.shape[1]}x{photo.shape[0]}: paint on the photo itself")
  return photo, mask


def parse_prompts(text: str | None) -> list[str]:
  prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
  if not prompts:
    raise InputError("write at least one prompt, e.g. 'a photo of a S'")
  return prompts


class Demo:
  """The page's state: one pipeline, the concept cache, the defaults the page starts from."""

  def __init__(self, pipe: Any, defaults: GenerationOptions | None = None, random_weights: bool = False):
    self.pipe = pipe
    self.defaults = pipe.options(defaults)
    self.random_weights = random_weights
    self.cache = ConceptCache()

  # -------------------------------------------------------------------------------------------------------------
  def run(self, editor, mask_file, prompts_text, lam, seed, guidance, steps, scheduler, num_images, height, width,
          words, placeholder, placeholder_index, inspect, progress=gr.Progress()):
    """The Run button: gallery, status line, word table, attention-map figures (one image). Bad input is a
    gr.Error."""
    try:
      return self._run(editor, mask_file, prompts_text, lam, seed, guidance, steps, scheduler, num_images, height,
                       width, words, placeholder, placeholder_index, inspect, progress)
    except InputError as e:
      raise gr.Error(html.escape(str(e), quote=False), print_exception=False) from None  # the page renders HTML

  def _run(self, editor, mask_file, prompts_text, lam, seed, guidance, steps, scheduler, num_images, height, width,
           words, placeholder, placeholder_index, inspect, progress):
    start = time.perf_counter()
    seed = _number(seed, "seed")
    seed = random.randrange(2 ** 31) if seed < 0 else seed
    opts = self.pipe.options(self.defaults, lam=_number(lam, "lambda"), seed=seed,
                             guidance=_number(guidance, "guidance"), steps=_number(steps, "steps"),
                             scheduler=scheduler, num_images=_number(num_images, "images per prompt"),
                             height=_number(height, "height"), width=_number(width, "width"), words=words,
                             placeholder=(placeholder or "").strip(), placeholder_index=placeholder_index)
    prompts = parse_prompts(prompts_text)
    photo, mask = photo_and_drawn_mask(editor)
    if mask_file:
      if mask is not None:
        gr.Warning("Both a painted and an uploaded mask: using the uploaded one.")
      mask = preprocess.load_mask(mask_file, size=photo.shape[:2])
    if mask is not None and self.pipe.local_mapper is None:
      gr.Warning("No local mapper is loaded (--local-mapper), so the mask is not used.")
      mask = None
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      self.pipe.prompt_indices(prompts, opts)  # prompt errors before any work
    for w in caught:
      gr.Warning(str(w.message))
    progress(0, desc="encoding the concept")
    concept, cached = self.cache.get(self.pipe, photo, mask)
    report = _progress_reporter(progress)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # the placeholder-rule warnings, already on the page
      if inspect:
        result = inspection.inspect(self.pipe, concept, prompts, opts, progress=report)
        images = result.images
      else:
        images = self.pipe.generate(concept, prompts, opts, progress=report)
    n = opts.num_images
    gallery = [(img, f"{prompts[i // n]} · #{i % n} · seed {seed}") for i, img in enumerate(images)]
    status = (f"{len(images)} image(s) of {images.shape[2]}x{images.shape[1]} in {time.perf_counter() - start:.1f} s "
              f"· seed {seed} · {opts.scheduler}, {opts.steps} steps, guidance {opts.guidance:g}, "
              f"lambda {opts.lam:g} · concept {'reused (cached)' if cached else 'encoded'} · "
              + (f"mask {_coverage(mask):.0%} of the photo" if mask is not None else "no mask"))
    if self.random_weights:
      status = "RANDOM WEIGHTS (images are noise) · " + status
    if not inspect:
      return gallery, status, "", None
    figures = [inspection.maps_figure(img, result.maps_of(i), caption) for i, (img, caption) in enumerate(gallery)]
    return gallery, status, inspection.format_words(result.words, result.vocabulary_norm), _stack(figures)


def _stack(figures: list) -> np.ndarray:
  """PIL images one under the other on white, below a margin that the component's label covers."""
  arrays = [np.asarray(f.convert("RGB")) for f in figures]
  width = max(a.shape[1] for a in arrays)
  pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=255)
  return np.concatenate([np.full((24, width, 3), 255, np.uint8)] + [pad(a) for a in arrays], axis=0)


def _coverage(mask: np.ndarray) -> float:
  """The share of the photo a (H, W) or (H, W, C) mask covers."""
  m = np.asarray(mask, bool)
  return float(np.mean(m.any(axis=-1) if m.ndim == 3 else m))


def _number(v: Any, name: str) -> int | float:
  """A field's number (whole floats as ints, as sliders send them), or an InputError naming the field."""
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise InputError(f"{name} must be a number, got {v!r}")
  return int(v) if isinstance(v, float) and v.is_integer() else v


def _progress_reporter(progress: Any):
  """The pipeline's progress callback, feeding gr.Progress. The sampling loop may call it from another thread, where
  gradio's context variables (which event it belongs to) are unset: run it in a copy of this thread's context."""
  context = contextvars.copy_context()

  def report(done: int, total: int) -> None:
    context.copy().run(progress, (done, total), desc="denoising", unit="steps")
  return report


# ---------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------

def create_app(pipe: Any, *, defaults: GenerationOptions | None = None, random_weights: bool = False) -> gr.Blocks:
  """The demo page for one loaded pipeline, starting from ``defaults`` (``GenerationOptions``)."""
  state = Demo(pipe, defaults, random_weights)
  d = state.defaults
  with gr.Blocks(title="ELITE demo" + (" (random weights)" if random_weights else ""),
                 analytics_enabled=False) as app:
    gr.Markdown("# ELITE in JAX: one photo of a concept, new images of it")
    if random_weights:
      gr.Markdown(RANDOM_BANNER, elem_id="random-weights")
    gr.Markdown(USAGE)
    with gr.Row():
      with gr.Column():
        editor = gr.ImageEditor(label="Photo: upload it, then paint the object with the brush", type="numpy",
                                image_mode="RGBA", sources=("upload", "clipboard"), format="png",
                                brush=gr.Brush(colors=[("#ffffff", 0.7)], color_mode="fixed"), layers=False,
                                transforms=(), elem_id="photo")
        mask_file = gr.Image(label="Or upload a mask (white = object, same size as the photo)", type="filepath",
                             image_mode=None, sources=("upload",), height=160, elem_id="mask")
        prompts = gr.Textbox(label="Prompts, one a line; S names the concept", lines=3,
                             value="a photo of a S\na S on the beach", elem_id="prompts")
        with gr.Row():
          lam = gr.Slider(0.0, 2.0, d.lam, step=0.05, label="Lambda (local branch)")
          num_images = gr.Slider(1, MAX_IMAGES, d.num_images, step=1, label="Images per prompt")
        run = gr.Button("Run", variant="primary", elem_id="run")
        with gr.Accordion("Settings", open=False):
          with gr.Row():
            seed = gr.Number(d.seed, label="Seed (-1: a new one each run)", precision=0, minimum=-1,
                             maximum=2 ** 31 - 1)
            guidance = gr.Slider(0.0, 30.0, d.guidance, step=0.5, label="Guidance")
            steps = gr.Slider(1, MAX_STEPS, d.steps, step=1, label="Steps")
          with gr.Row():
            scheduler = gr.Dropdown(list(SAMPLERS), value=d.scheduler, label="Scheduler")
            height = gr.Slider(MIN_SIDE, MAX_SIDE, d.height, step=8, label="Height")
            width = gr.Slider(MIN_SIDE, MAX_SIDE, d.width, step=8, label="Width")
          with gr.Row():
            words = gr.Radio(list(WORDS), value=d.words, label="Words injected (w0 only, or all five)")
            placeholder = gr.Textbox(d.placeholder, label="Placeholder")
            placeholder_index = gr.Radio(list(INDEX_MODES), value=d.placeholder_index,
                                         label="Placeholder index (official whitespace rule, or the token)")
        inspect = gr.Checkbox(False, label="Inspect: the words' nearest tokens and where w0 attends",
                              elem_id="inspect")
      with gr.Column():
        gallery = gr.Gallery(label="Generated", columns=2, height="auto", format="png", elem_id="gallery")
        status = gr.Markdown(label="Status", elem_id="status")
    with gr.Accordion("Inspection (tick Inspect): the words, and where w0 and the local branch act", open=True):
      word_table = gr.Markdown(label="Words", elem_id="words")
      figures = gr.Image(label="Attention maps: w0 at each resolution, then the local weight lambda * M",
                         type="numpy", format="png", interactive=False, elem_id="figures")
    inputs = [editor, mask_file, prompts, lam, seed, guidance, steps, scheduler, num_images, height, width, words,
              placeholder, placeholder_index, inspect]
    # One generation at a time: one pipeline, one device.
    run.click(state.run, inputs, [gallery, status, word_table, figures], api_name="generate", concurrency_limit=1)
  app.elite_demo = state  # the state behind the page (tests read the cache's counters)
  return app


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True) -> str:
  """Serve the page; returns its URL, the public one with ``share`` (``block=False`` returns at once, for tests and
  notebooks; otherwise this serves until interrupted)."""
  app.queue(max_size=16)
  app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, show_error=True,
             ssr_mode=False, theme=gr.themes.Default(**THEME_FONTS), footer_links=["api"])
  return app.share_url if share else app.local_url
