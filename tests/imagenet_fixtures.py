"""Tiny ILSVRC2012 tars in the real layout, with natural-image-like JPEGs."""

import io
import os
import tarfile

import numpy as np
from PIL import Image

SYNSETS = ('n01440764', 'n01443537', 'n01484850')
# Names of train images that the tfds builder converts to RGB JPEG: one of
# ILSVRC2012's 22 CMYK JPEGs and its one PNG.
CMYK_NAME = 'n01739381_1309.JPEG'
PNG_NAME = 'n02105855_2933.JPEG'


def natural_jpeg(seed: int, height: int = 375, width: int = 500) -> bytes:
  """Smooth random fields with edges and noise: compresses like a photo
  (about 20-60 KB at 500 x 375), unlike uniform noise."""
  rng = np.random.default_rng(seed)
  low = rng.random((height // 25 + 2, width // 25 + 2, 3))
  field = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize(
      (width, height), Image.BICUBIC), np.float32)
  y, x = np.mgrid[:height, :width]
  stripes = 40 * np.sin((x * rng.uniform(0.02, 0.1)) + (y * rng.uniform(
      0.01, 0.05)))[..., None]
  pixels = field + stripes + rng.normal(0, 6, field.shape)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
      buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def _add(archive, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  archive.addfile(info, io.BytesIO(payload))


def _encoded(jpeg: bytes, mode: str, fmt: str) -> bytes:
  """A fixture JPEG re-encoded in another PIL mode and format."""
  buffer = io.BytesIO()
  Image.open(io.BytesIO(jpeg)).convert(mode).save(buffer, format=fmt)
  return buffer.getvalue()


def write_tars(manual_dir: str, train: dict[str, list[tuple[str, bytes]]],
               val: list[bytes]) -> None:
  """ILSVRC2012_img_train.tar, one inner '<synset>.tar' per key of train
  holding its (file name, bytes) images, and ILSVRC2012_img_val.tar with
  val as ILSVRC2012_val_00000001.JPEG, ..."""
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'),
                    'w') as outer:
    for synset, images in train.items():
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as archive:
        for name, payload in images:
          _add(archive, name, payload)
      _add(outer, f'{synset}.tar', inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'),
                    'w') as archive:
    for i, payload in enumerate(val, start=1):
      _add(archive, f'ILSVRC2012_val_{i:08d}.JPEG', payload)


def write_manual_dir(manual_dir: str, per_class: int = 4, num_val: int = 10,
                     corrupt: str | None = None,
                     cmyk_and_png: bool = False) -> None:
  """ILSVRC2012_img_train.tar (one inner tar per synset of SYNSETS) and
  ILSVRC2012_img_val.tar of natural_jpeg images; the train image named
  `corrupt` gets garbage bytes after a valid JPEG header. cmyk_and_png: the
  first class also holds a CMYK JPEG named CMYK_NAME and a PNG named
  PNG_NAME (240 x 320 each)."""
  sizes = [(375, 500), (333, 500), (500, 375), (240, 320), (500, 500)]
  train = {}
  for c, synset in enumerate(SYNSETS):
    images = train[synset] = []
    for k in range(per_class):
      name = f'{synset}_{k}.JPEG'
      payload = natural_jpeg(100 * c + k, *sizes[(c + k) % len(sizes)])
      if name == corrupt:
        payload = payload[:200] + b'\x00garbage' * 50
      images.append((name, payload))
    if cmyk_and_png and c == 0:
      source = natural_jpeg(999, 240, 320)
      images.append((CMYK_NAME, _encoded(source, 'CMYK', 'JPEG')))
      images.append((PNG_NAME, _encoded(source, 'RGB', 'PNG')))
  write_tars(manual_dir, train, [
      natural_jpeg(10_000 + i, *sizes[i % len(sizes)])
      for i in range(1, num_val + 1)])
