"""An OpenImages V6 layout in miniature (the official directory and CSV layout) made of the bundled DreamBench photos,
ellipse masks and a few broken files; shared by the data and training tests."""

import shutil
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

DATA = Path(__file__).parent / "data" / "dreambench"

# ImageID, XMin, XMax, YMin, YMax; the comment says what the official dataset does with the row.
BBOXES = [
    ("dog00", 0.1, 0.6, 0.2, 0.7),  # kept
    ("dog00", 0.0, 1.0, 0.0, 1.0),  # area 1 > 0.8: filtered
    ("dog01", 0.4, 0.5, 0.4, 0.5),  # area 0.01 < 0.02: filtered
    ("dog01", 0.0, 0.9, 0.05, 0.9),  # kept; padding clamped at the left
    ("teapot00", 0.25, 0.75, 0.25, 0.75),  # kept
    ("teapot01", 0.5, 1.0, 0.6, 0.99),  # kept; padding clamped at the right and bottom
    ("wide00", 0.1234567, 0.8765432, 0.3, 0.95),  # kept; 512x384 image
    ("broken", 0.1, 0.5, 0.1, 0.5),  # truncated JPEG: skipped
    ("ghost", 0.1, 0.5, 0.1, 0.5),  # no image file: skipped
    ("notajpeg", 0.1, 0.5, 0.1, 0.5),  # a text file: skipped
]
# MaskPath -> (mask size WxH, shapes at that size: ellipses ((cx, cy), (ax, ay)) or inclusive rectangles
# ("rect", x0, y0, x1, y1)); None: a text file; "absent": no file.
MASKS = {
    "dog00_m01_a.png": ((512, 512), [("rect", 146, 91, 367, 390)]),  # kept; odd sides: made even at the far end
    "dog01_m01_b.png": ((256, 256), [((128, 128), (70, 60))]),  # kept; mask at half the image's size
    "teapot00_m01_c.png": ((512, 512), [((256, 256), (30, 30))]),  # 61 px: filtered (< 100)
    "teapot01_m01_d.png": ((512, 512), [((256, 256), (200, 60))]),  # 401x121: filtered (aspect)
    "wide00_m01_e.png": ((512, 384), [((60, 70), (55, 65))]),  # kept; padding clamped at the top/left
    "teapot02_m01_f.png": ((512, 512), [((440, 430), (70, 80)), ("rect", 400, 350, 511, 511)]),  # kept; touches
    # the bottom/right edges with odd sides (the box grows to the image's end), padding clamped there
    "teapot03_m01_l.png": ((512, 512), [((150, 150), (50, 60)), ((350, 330), (60, 50))]),  # kept; two contours
    "dog04_m01_k.png": ((512, 512), []),  # empty: filtered (no box)
    "dog02_m01_g.png": None,  # unreadable mask: skipped
    "broken_m01_h.png": ((512, 512), [((256, 256), (120, 120))]),  # truncated image: skipped
    "ghost_m01_i.png": ((512, 512), [((256, 256), (120, 120))]),  # no image: skipped
    "dog03_m01_j.png": "absent",  # no mask file: skipped
}

def ellipse_mask(size, shapes) -> np.ndarray:
  mask = np.zeros((size[1], size[0]), np.uint8)
  for shape in shapes:
    if shape[0] == "rect":
      cv2.rectangle(mask, shape[1:3], shape[3:5], 255, -1)
    else:
      cv2.ellipse(mask, shape[0], shape[1], 0, 0, 360, 255, -1)
  return mask


def write_openimages(root: Path) -> Path:
  (root / "annotations").mkdir(parents=True)
  images, segs = root / "images" / "test", root / "segs" / "test"
  images.mkdir(parents=True)
  segs.mkdir(parents=True)
  for kind in ("dog", "teapot"):
    for i in range(5):
      shutil.copy(DATA / kind / f"{i:02d}.jpg", images / f"{kind}{i:02d}.jpg")
  Image.open(DATA / "dog" / "02.jpg").crop((0, 64, 512, 448)).save(images / "wide00.jpg", quality=90)
  jpeg = (DATA / "teapot" / "04.jpg").read_bytes()
  (images / "broken.jpg").write_bytes(jpeg[:len(jpeg) // 3])
  (images / "notajpeg.jpg").write_text("not a picture")
  (root / "annotations" / "oidv6-class-descriptions.csv").write_text(
      "LabelName,DisplayName\n/m/dog,Dog\n/m/teapot,Teapot\n")
  lines = ["ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,"
           "IsInside"]
  for image_id, x0, x1, y0, y1 in BBOXES:
    lines.append(f"{image_id},xclick,/m/{'teapot' if 'teapot' in image_id else 'dog'},1,{x0},{x1},{y0},{y1},0,0,0,0,0")
  (root / "annotations" / "test-annotations-bbox.csv").write_text("\n".join(lines) + "\n")
  lines = ["MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks"]
  for mask_path, spec in MASKS.items():
    image_id = mask_path.split("_")[0]
    lines.append(f"{mask_path},{image_id},/m/dog,b0,0.1,0.9,0.1,0.9,0.9,")
    if spec is None:
      (segs / mask_path).write_text("not a png")
    elif spec != "absent":
      cv2.imwrite(str(segs / mask_path), ellipse_mask(*spec))
  (root / "annotations" / "test-annotations-object-segmentation.csv").write_text("\n".join(lines) + "\n")
  return root
