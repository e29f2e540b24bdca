"""The demo page, served for real on the tiny random models: driven through its API (gradio_client) and in a headless
Chromium (selenium), one launch for the module.

In CI (``CI`` set, as ``.ci/run`` does, which also installs Debian's chromium and chromium-driver) a missing browser or
package fails these tests; elsewhere they skip, saying what to install.
"""

import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elite_jax import inspection, preprocess
from elite_jax.options import GenerationOptions
from elite_jax.pipeline import ElitePipeline

IN_CI = bool(os.environ.get("CI"))
SIZE, STEPS = 64, 2
PAGE_TIMEOUT, RUN_TIMEOUT = 60, 600  # seconds: the first run compiles the sampling loop
# ELITE_DEMO_SCREENSHOT=docs/demo_random_weights.png: where the browser test also saves its final screenshot
SCREENSHOT = os.environ.get("ELITE_DEMO_SCREENSHOT")


def _need(module: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    if IN_CI:
      raise
    pytest.skip(f"{module} is not installed (pip install -e '.[test]' brings it; CI requires it)",
                allow_module_level=True)


gr = _need("gradio")
gradio_client = _need("gradio_client")
demo = importlib.import_module("elite_jax.demo")  # after the check: it imports gradio
cli_demo = importlib.import_module("elite_jax.cli.demo")
from elite_jax.cli import common  # noqa: E402
REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "tests" / "data" / "dreambench" / "dog" / "00.jpg"


@pytest.fixture(scope="module")
def served():
  pipe = ElitePipeline.from_random()
  app = demo.create_app(pipe, defaults=GenerationOptions(height=SIZE, width=SIZE, steps=STEPS), random_weights=True)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = demo.launch(app, port=port, block=False)
  yield app, url
  app.close()


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
  h, w = preprocess.load_image(PHOTO).shape[:2]
  yy, xx = np.mgrid[:h, :w]
  mask = ((((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2) < 1).astype(np.uint8) * 255
  path = tmp_path_factory.mktemp("demo") / "mask.png"
  Image.fromarray(mask).save(path)
  return path


def _args(**over):
  handle = gradio_client.handle_file
  args = dict(editor={"background": handle(str(PHOTO)), "layers": [], "composite": None}, mask_file=None,
              prompts_text="a photo of a S\na S on the beach", lam=0.8, seed=0, guidance=5.0, steps=STEPS,
              scheduler="lms", num_images=2, height=SIZE, width=SIZE, words="primary", placeholder="S",
              placeholder_index="whitespace", inspect=False)
  args.update(over)
  return args


# ---------------------------------------------------------------------------------------------------------------
# Through the API
# ---------------------------------------------------------------------------------------------------------------

def test_api_generates_the_library_images_and_reuses_the_concept(served, mask_file, monkeypatch):
  app, url = served
  client = gradio_client.Client(url, verbose=False)
  # what gr.Progress hands the queue (it sends the latest of these to the page every so often)
  progress = []
  send = app._queue.set_progress
  monkeypatch.setattr(app._queue, "set_progress", lambda event_id, iterables: (
      progress.append([(it.desc, it.index, it.length) for it in iterables]), send(event_id, iterables)))
  gallery, status, words, figures = client.predict(**_args(mask_file=gradio_client.handle_file(str(mask_file))),
                                                   api_name="/generate")
  assert [g["caption"] for g in gallery] == ["a photo of a S · #0 · seed 0", "a photo of a S · #1 · seed 0",
                                             "a S on the beach · #0 · seed 0", "a S on the beach · #1 · seed 0"]
  got = np.stack([np.asarray(Image.open(g["image"]).convert("RGB")) for g in gallery])
  coverage = np.mean(np.asarray(Image.open(mask_file)) > 0)
  assert "RANDOM WEIGHTS" in status and "concept encoded" in status and f"mask {coverage:.0%} of the photo" in status
  assert words == "" and figures is None
  # the sampling loop's progress reached the page's event, step by step (2 steps, one batch of 4)
  assert [p[-1] for p in progress] == [("encoding the concept", None, None), ("denoising", 1, STEPS),
                                       ("denoising", 2, STEPS)]
  # the page passes every setting through: the same images as the library gives for them
  state = app.elite_demo
  concept = state.pipe.encode_concept(PHOTO, mask_file)
  want = state.pipe.generate(concept, ["a photo of a S", "a S on the beach"], num_images=2, seed=0, steps=STEPS,
                             height=SIZE, width=SIZE, lam=0.8, progress=False)
  np.testing.assert_array_equal(got, want)
  # other prompts, the same photo and mask: the concept is not encoded again
  _, status, _, _ = client.predict(**_args(mask_file=gradio_client.handle_file(str(mask_file)),
                                           prompts_text="a red S\na S in the snow", seed=1), api_name="/generate")
  assert "concept reused (cached)" in status and "seed 1" in status
  assert state.cache.encoded == 1


def test_api_bad_input_is_a_message_and_the_app_keeps_serving(served, tmp_path):
  _, url = served
  client = gradio_client.Client(url, verbose=False)
  small = tmp_path / "small.png"
  Image.fromarray(np.full((10, 12), 255, np.uint8)).save(small)
  cases = [(_args(prompts_text="a photo of a dog"), "has no placeholder 'S' as a word of its own"),
           (_args(mask_file=gradio_client.handle_file(str(small))), "is 12x10 (WxH) but the image is"),
           (_args(height=100), "multiples of 8"),
           (_args(lam=2.5), "2.5"),  # the slider's bound, checked by gradio
           (_args(editor=None), "upload a photo of the concept first"),
           (_args(seed=None), "seed must be a number, got None"),
           (_args(prompts_text="  \n "), "write at least one prompt")]
  for args, message in cases:
    with pytest.raises(gradio_client.exceptions.AppError) as e:
      client.predict(**args, api_name="/generate")
    assert message in str(e.value), (message, str(e.value))
    assert "Traceback" not in str(e.value)
  gallery, status, _, _ = client.predict(**_args(), api_name="/generate")  # and a good request still works
  assert len(gallery) == 4 and "no mask" in status


def test_command_flags_and_bad_input(capsys):
  proc = subprocess.run([sys.executable, "-m", "elite_jax.cli.demo", "--help"], capture_output=True, text=True,
                        timeout=300, cwd=REPO)
  assert proc.returncode == 0 and "--share" in proc.stdout and "--global-mapper" in proc.stdout
  assert cli_demo.main(["--random-weights", "--port", "0"]) == 2
  assert capsys.readouterr().err.strip().splitlines() == ["error: --port must be in 1..65535, got 0"]
  assert cli_demo.main([]) == 2  # real weights need a mapper: said before anything loads
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --global-mapper is required")
  args = cli_demo.parse_args(["--random-weights"])  # tiny models start the page small
  assert (args.height, args.width, args.steps) == (64, 64, common.RANDOM_DEFAULTS.steps)
  assert cli_demo.parse_args([]).steps == 100


# ---------------------------------------------------------------------------------------------------------------
# In a browser
# ---------------------------------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1400,1700")


def _chromium():
  browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
  if not (browser and driver):
    message = "chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)"
    if IN_CI:
      pytest.fail(message + "; .ci/run installs them")
    pytest.skip(message + "; CI installs them and requires this test")
  from selenium import webdriver  # noqa: PLC0415 - only once the browser is known to be there
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tempfile.mkdtemp(prefix='elite_chromium_')}",):
    options.add_argument(flag)
  return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


@pytest.mark.full
def test_browser_upload_paint_run(served, tmp_path):
  _need("selenium")
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  _, url = served
  browser = _chromium()
  failure = tmp_path / "demo_failure.png"
  try:
    browser.get(url)
    find = lambda css: browser.find_element(By.CSS_SELECTOR, css)
    WebDriverWait(browser, PAGE_TIMEOUT).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
    assert "RANDOM WEIGHTS" in find("#random-weights").text
    zoom = find("#photo .zoom-number").text
    find("#photo input[type=file]").send_keys(str(PHOTO))
    # the editor zooms to fit the photo once it is on the canvas
    WebDriverWait(browser, PAGE_TIMEOUT).until(lambda b: find("#photo .zoom-number").text != zoom)
    time.sleep(0.5)
    canvas = find("#photo .pixi-target canvas")
    find("#photo button[aria-label=Brush]").click()
    strokes = ActionChains(browser)
    for dy in range(-40, 50, 8):  # paint the middle of the photo, where the dog is
      strokes.move_to_element_with_offset(canvas, -60, dy).click_and_hold().move_by_offset(120, 0).release()
    strokes.perform()
    find("#inspect input[type=checkbox]").click()
    find("#run").click()
    WebDriverWait(browser, RUN_TIMEOUT).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2)
    images = browser.find_elements(By.CSS_SELECTOR, "#gallery img")
    WebDriverWait(browser, PAGE_TIMEOUT).until(lambda b: all(
        b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) for i in images))
    assert [browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", i)
            for i in images] == [[SIZE, SIZE]] * 2
    status = find("#status").text
    assert "2 image(s) of 64x64" in status and "RANDOM WEIGHTS" in status and "mask " in status, status
    coverage = int(status.split("mask ")[1].split("%")[0])
    assert 2 <= coverage <= 60, status  # the painted strokes, not the whole photo and not nothing
    WebDriverWait(browser, PAGE_TIMEOUT).until(lambda b: "| w0 |" in b.page_source or "w0" in find("#words").text)
    figures = find("#figures img")  # one row of attention maps per image: image + w0 and local at 3 resolutions
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", figures)
    assert size[0] == 7 * inspection.MIN_PANEL and size[1] > 2 * inspection.MIN_PANEL, size
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, min(height + 120, 4000))  # the whole page in the screenshot
    time.sleep(1)
    browser.save_screenshot(str(tmp_path / "demo.png"))
    if SCREENSHOT:
      Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(tmp_path / "demo.png", SCREENSHOT)
  except Exception:
    browser.save_screenshot(str(failure))
    print(f"browser test failed; screenshot: {failure}")
    raise
  finally:
    browser.quit()
