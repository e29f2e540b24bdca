"""The Colab notebook runs top to bottom offline with RANDOM_WEIGHTS on, and shows the generated grid."""

import base64
import io
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from elite_jax import inspection

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "elite_colab.ipynb"


@pytest.mark.full
def test_notebook_runs_offline_with_random_weights(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  settings = nb.cells[1].source
  assert "RANDOM_WEIGHTS = True" in settings  # the switch, on as committed
  assert "OWNER" not in "".join(cell.source for cell in nb.cells)  # no placeholder URL to fail on
  # The kernel is this interpreter (so this venv), offline, on CPU, with the repo importable.
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # the tests' persistent compilation cache (conftest), so that a rerun skips most compiling
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir or "")
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  from ipykernel.kernelspec import write_kernel_spec
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager
  write_kernel_spec(str(tmp_path / "kernels" / "elite-test"))  # argv: this sys.executable -m ipykernel_launcher
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  assert specs.get_kernel_spec("elite-test").argv[0] == sys.executable
  km = AsyncKernelManager(kernel_name="elite-test", kernel_spec_manager=specs)
  client = nbclient.NotebookClient(nb, km=km, timeout=600, allow_errors=False,
                                   resources={"metadata": {"path": str(REPO / "notebooks")}})
  client.execute()

  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  pngs = [o["data"]["image/png"] for o in outputs if o.get("output_type") == "display_data" and "image/png" in
          o.get("data", {})]
  assert len(pngs) == 3  # the concept photo, the grid, the attention maps
  grid = np.asarray(Image.open(io.BytesIO(base64.b64decode(pngs[1]))))
  # 4 prompts x 2 images of 64 px, with the label column
  assert grid.shape[0] == 4 * 64 and grid.shape[1] == 240 + 2 * 64
  maps = Image.open(io.BytesIO(base64.b64decode(pngs[2])))
  assert maps.size[0] == 7 * inspection.MIN_PANEL  # the image, w0 and the local weight at 3 resolutions
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "RANDOM WEIGHTS" in text and "not in Colab" in text and "00.jpg" in text
  assert f"this checkout, {REPO} (already installed)" in text  # run from a checkout: that checkout, not a clone
  assert "| w0 |" in text and "| w4 |" in text  # the word table
  assert "demo page built" in text


def test_install_cell_outside_a_checkout_says_what_to_set(tmp_path, monkeypatch):
  """Not in a checkout, no REPO_URL, elite_jax not installed: one plain line, no clone of a placeholder URL."""
  import importlib.util
  install = nbformat.read(NOTEBOOK, as_version=4).cells[3].source
  assert "find_checkout" in install
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "elite_jax" else real(name, *a))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as e:
    exec(install, {"REPO_URL": "", "RANDOM_WEIGHTS": True})
  assert str(e.value) == ("Set REPO_URL in the first cell to the git URL of elite-jax (or run this notebook in a "
                          "checkout).")
