"""Writing outputs so that a crash never leaves a half-written file under the real name: write beside, then rename."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary path beside ``path``; renames it to ``path`` when the block ends without an error (removes
  it otherwise). A rename within a folder is atomic: readers see the old file or the whole new one."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # unique: writers never collide
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
  """(H, W, 3) uint8 as a PNG file, atomically."""
  with atomic_path(path) as tmp:
    Image.fromarray(np.asarray(image)).save(tmp, format="PNG")
  return Path(path)
