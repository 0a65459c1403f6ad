"""Prepares imagenet2012 as tfds array_record from the manual download.

  python -m nfnets.prepare_imagenet --manual_dir=DIR --data_dir=DIR \
      [--max_shorter_side=320]

DIR (manual) holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from
image-net.org. The result is read by `tfds.data_source('imagenet2012')`.
Before converting, every image of both tars is counted (headers only, a few
minutes) and a count other than ILSVRC2012's (1,281,167 train, 50,000
validation) is refused, naming the tar: a truncated download must not become
a silently smaller dataset. --allow_subset accepts other counts (tests);
a warning then names the classes that have no train images (a train tar cut
at a file boundary reads without error, just missing its last classes).

--max_shorter_side=N stores every image whose shorter side is longer than N
px re-encoded with that side N px (aspect kept, never upscaled; JPEG
quality JPEG_QUALITY), as fast ImageNet loaders do: decoding is then about
twice as fast. Which N suits which config: docs/training.md ("The ImageNet
pipeline"). The setting is recorded in METADATA_FILE inside the prepared
version folder (<data_dir>/imagenet2012/<version>/), which training reads
and reports; a dataset without that file is full-size.

TensorFlow is not needed: tfds's imagenet2012 builder and its archive reader
only touch `tf.io.gfile.exists`, `tf.io.gfile.GFile` and
`tf.compat.as_text`, which this module provides to them for local paths, and
the builder's conversion of its 22 CMYK JPEGs and one PNG to RGB JPEGs
(`tf.image`), which this module does with Pillow (everything else in tfds's
preparation is TensorFlow-free). The tars are checked before the
(hours-long) conversion starts.
"""

import collections
from concurrent import futures
import io
import importlib.util
import json
import multiprocessing
import os
import tarfile
import types

from absl import flags
from PIL import Image

from nfnets import cli
from nfnets import errors

TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
EXPECTED_COUNTS = {TRAIN_TAR: 1_281_167, VAL_TAR: 50_000}
# Inside the tensorflow_datasets package: one wnid per line, in label order.
LABELS_FILE = os.path.join('datasets', 'imagenet2012', 'labels.txt')
# The preparation settings, written next to tfds's dataset_info.json.
METADATA_FILE = 'nfnets_prepare.json'
# Re-encoded (capped) images: JPEG quality, libjpeg's default 4:2:0 chroma
# subsampling (as most ImageNet JPEGs have).
JPEG_QUALITY = 95
# tfds stores its CMYK/PNG conversions at quality 100 (tfds.core.utils).
_CONVERTED_QUALITY = 100
# Images in flight to the re-encoding processes, per process.
_IN_FLIGHT_PER_PROCESS = 32


def _local_tf_shim():
  """The three TensorFlow functions tfds's ImageNet preparation calls."""
  gfile = types.SimpleNamespace(exists=os.path.exists, GFile=open)
  as_text = lambda x: x.decode('utf-8') if isinstance(x, bytes) else x
  return types.SimpleNamespace(io=types.SimpleNamespace(gfile=gfile),
                               compat=types.SimpleNamespace(as_text=as_text))


def check_manual_dir(manual_dir: str) -> None:
  """Raises FileNotFoundError / ValueError naming a missing or bad tar."""
  for name, inner_suffix in ((TRAIN_TAR, '.tar'), (VAL_TAR, '.JPEG')):
    path = os.path.join(manual_dir, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f'{path} not found: download {name} from image-net.org into '
          f'{manual_dir}.')
    try:
      with tarfile.open(path) as archive:
        first = archive.next()
    except (tarfile.TarError, OSError) as e:
      raise ValueError(f'{path} is not a readable tar archive: {e}') from e
    if first is None or not first.name.endswith(inner_suffix):
      raise ValueError(
          f'{path} does not look like {name}: its first member is '
          f'{first.name if first else "nothing"!r}, expected a '
          f'"*{inner_suffix}" file.')


def count_images(path: str) -> tuple[int, set[str]]:
  """(JPEG files in an ILSVRC2012 tar, the wnids of the train tar's
  per-class tars that hold at least one; empty for the val tar). Raises
  ValueError naming the tar if it is cut mid-file."""
  count, classes = 0, set()
  try:
    with tarfile.open(path) as archive:
      for member in archive:
        if member.name.endswith('.JPEG'):
          count += 1
        elif member.name.endswith('.tar'):
          with tarfile.open(fileobj=archive.extractfile(member)) as inner:
            images = sum(m.name.endswith('.JPEG') for m in inner)
          count += images
          if images:
            classes.add(os.path.basename(member.name)[:-len('.tar')])
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(
        f'{path} is damaged or truncated after {count:,} images ({e}); '
        'download it again.') from None
  return count, classes


def class_names() -> list[str]:
  """The 1000 ILSVRC2012 wnids, in label order: tfds's imagenet2012 label
  file (found without importing tfds)."""
  package = importlib.util.find_spec('tensorflow_datasets')
  path = os.path.join(os.path.dirname(package.origin), LABELS_FILE)
  with open(path) as f:
    return f.read().split()


def check_counts(manual_dir: str, allow_subset: bool = False,
                 warn=print) -> dict:
  """{tar name: image count}; raises ValueError for a count that is not
  ILSVRC2012's unless allow_subset. warn(line) hears of classes without
  train images: a train tar cut at a file boundary reads without error."""
  counts = {}
  for name, expected in EXPECTED_COUNTS.items():
    path = os.path.join(manual_dir, name)
    counts[name], classes = count_images(path)
    if counts[name] != expected and not allow_subset:
      raise ValueError(
          f'{path} holds {counts[name]:,} images, ILSVRC2012 has '
          f'{expected:,}: the file is truncated or not the original; '
          'download it again (or pass --allow_subset for a deliberate '
          'subset).')
    if name == TRAIN_TAR:
      names = class_names()
      missing = [wnid for wnid in names if wnid not in classes]
      if missing:
        warn(f'warning: {path} has no images of {len(missing)} of the '
             f'{len(names)} classes (' + ', '.join(missing[:5])
             + (', ...' if len(missing) > 5 else '') + '); the prepared '
             'train split will have none of them.')
  return counts


def _as_rgb_jpeg(encoded: bytes, quality: int) -> bytes:
  """Any image Pillow reads (CMYK JPEG, PNG, ...) as an RGB JPEG."""
  with Image.open(io.BytesIO(encoded)) as image:
    output = io.BytesIO()
    image.convert('RGB').save(output, format='JPEG', quality=quality)
  return output.getvalue()


def _capped_or_none(encoded: bytes, max_shorter_side: int) -> bytes | None:
  """The image as a JPEG (quality JPEG_QUALITY) with its shorter side
  max_shorter_side px and the aspect ratio kept, or None where it stays as
  it is: its shorter side is at most that already, or Pillow cannot decode
  it (training then skips and counts it, as it would the original).

  JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
  them at least the target size, then resized with Pillow's antialiased
  bicubic filter. Greyscale stays greyscale; other modes (CMYK, palette,
  RGBA, 16-bit) become RGB, as training would decode them.
  """
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      width, height = image.size
      if min(width, height) <= max_shorter_side:
        return None
      if width <= height:
        size = (max_shorter_side, max(1, round(height * max_shorter_side
                                               / width)))
      else:
        size = (max(1, round(width * max_shorter_side / height)),
                max_shorter_side)
      mode = image.mode if image.mode in ('RGB', 'L') else 'RGB'
      image.draft(mode, size)  # JPEG only; keeps at least `size` pixels
      resized = image.convert(mode).resize(size, Image.Resampling.BICUBIC)
    output = io.BytesIO()
    resized.save(output, format='JPEG', quality=JPEG_QUALITY)
    return output.getvalue()
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None


def cap_shorter_side(encoded: bytes, max_shorter_side: int) -> bytes:
  """Encoded image bytes as --max_shorter_side stores them: re-encoded with
  the shorter side max_shorter_side px if it is longer, else unchanged
  (0 = always unchanged)."""
  if not max_shorter_side:
    return encoded
  capped = _capped_or_none(encoded, max_shorter_side)
  return encoded if capped is None else capped


def _capped_examples(examples, max_shorter_side: int, pool, window: int,
                     counts: dict):
  """tfds (key, example) pairs with each example's image replaced by
  cap_shorter_side's bytes, in the same order; the work goes to pool (a
  process pool executor; None: this process), at most window images ahead.
  counts gets 'resized' and 'kept' added up."""
  pending = collections.deque()

  def finish():
    key, example, encoded, result = pending.popleft()
    capped = result.result() if pool else result
    counts['kept' if capped is None else 'resized'] += 1
    return key, {**example, 'image': encoded if capped is None else capped}

  for key, example in examples:
    image = example['image']  # a file object of the tar stream, or bytes
    encoded = image if isinstance(image, bytes) else image.read()
    arguments = (encoded, max_shorter_side)
    pending.append((key, example, encoded,
                    pool.submit(_capped_or_none, *arguments) if pool
                    else _capped_or_none(*arguments)))
    if len(pending) >= window:
      yield finish()
  while pending:
    yield finish()


def stored_max_shorter_side(dataset_dir: str) -> int:
  """The --max_shorter_side a prepared imagenet2012 version folder
  (<data_dir>/imagenet2012/<version>) was stored with; 0 = full size, also
  for datasets prepared without METADATA_FILE. ValueError naming the file if
  it holds something else."""
  path = os.path.join(dataset_dir, METADATA_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      record = json.load(f)
  except FileNotFoundError:
    return 0
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not a readable preparation record: {e}; '
                     'prepare the dataset again.') from None
  value = record.get('max_shorter_side') if isinstance(record, dict) else None
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f'{path}: max_shorter_side should be an integer >= 0, '
                     f'got {value!r}; prepare the dataset again.')
  return value


def describe_storage(max_shorter_side: int) -> str:
  """'full-size' or 'pre-resized to shorter side N px'."""
  return (f'pre-resized to shorter side {max_shorter_side} px'
          if max_shorter_side else 'full-size')


def check_max_shorter_side(max_shorter_side) -> None:
  """ValueError unless the value is an integer >= 0."""
  if (isinstance(max_shorter_side, bool) or not isinstance(max_shorter_side,
                                                           int)
      or max_shorter_side < 0):
    raise ValueError(f'--max_shorter_side must be an integer >= 0 (px; 0 = '
                     f'keep the original images), got {max_shorter_side!r}.')


def _hook_builder(builder, builder_module, max_shorter_side: int, pool,
                  window: int, counts: dict) -> None:
  """Replaces three of builder's methods on this instance only: its
  CMYK/PNG fix (TensorFlow) by Pillow's, its example generator by one that
  caps the images (max_shorter_side > 0), and its preparation by one that
  also writes METADATA_FILE into the folder being prepared (tfds moves it
  into place with the data, so a dataset never lacks it)."""
  converted = set(builder_module.CMYK_IMAGES) | set(builder_module.PNG_IMAGES)

  def fix_image(image_fname, image):
    if image_fname in converted:
      return io.BytesIO(_as_rgb_jpeg(image.read(), _CONVERTED_QUALITY))
    return image

  generate = builder._generate_examples  # pylint: disable=protected-access

  def generate_capped(*args, **kwargs):
    yield from _capped_examples(generate(*args, **kwargs), max_shorter_side,
                                pool, window, counts)

  download_and_prepare = builder._download_and_prepare  # pylint: disable=protected-access

  def download_and_prepare_recorded(*args, **kwargs):
    download_and_prepare(*args, **kwargs)
    record = {'max_shorter_side': max_shorter_side,
              'storage': describe_storage(max_shorter_side)}
    if max_shorter_side:
      record.update(jpeg_quality=JPEG_QUALITY,
                    resampling='JPEG DCT scaling, then Pillow bicubic '
                               '(antialiased)',
                    images_resized=counts['resized'],
                    images_kept=counts['kept'])
    with open(os.path.join(builder.data_dir, METADATA_FILE), 'w',
              encoding='utf-8') as f:
      json.dump(record, f, indent=1)

  builder._fix_image = fix_image  # pylint: disable=protected-access
  if max_shorter_side:
    builder._generate_examples = generate_capped  # pylint: disable=protected-access
  builder._download_and_prepare = download_and_prepare_recorded  # pylint: disable=protected-access


def prepare(manual_dir: str, data_dir: str, allow_subset: bool = False,
            max_shorter_side: int = 0, processes: int | None = None) -> str:
  """Converts the tars into array_record under data_dir; returns its path
  (<data_dir>/imagenet2012/<version>).

  max_shorter_side > 0 caps every image's shorter side (cap_shorter_side),
  in `processes` worker processes (None: one per CPU core this process may
  use; 0 or 1: in this process). ValueError if data_dir already holds the
  dataset prepared with another max_shorter_side.
  """
  check_max_shorter_side(max_shorter_side)
  check_manual_dir(manual_dir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.download import extractor  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as builder_module  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common  # pylint: disable=g-import-not-at-top
  shim = _local_tf_shim()
  for module in (extractor, builder_module, imagenet_common):
    module.tf = shim
  builder = builder_module.Builder(data_dir=data_dir,
                                   file_format='array_record')
  if builder.is_prepared():  # tfds would keep it as it is
    stored = stored_max_shorter_side(builder.data_dir)
    if stored != max_shorter_side:
      raise ValueError(
          f'{builder.data_dir} already holds imagenet2012 '
          f'{describe_storage(stored)}, not --max_shorter_side='
          f'{max_shorter_side}: use another --data_dir (or delete that '
          'folder first).')
    return builder.data_dir
  check_counts(manual_dir, allow_subset)
  if processes is None:
    processes = len(os.sched_getaffinity(0))
  counts = collections.Counter()
  pool = None
  if max_shorter_side and processes > 1:
    # spawn: this process may already run threads (tfds, JAX in tests). A
    # worker that dies fails the preparation (BrokenProcessPool), not hangs.
    pool = futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context('spawn'))
  try:
    _hook_builder(builder, builder_module, max_shorter_side, pool,
                  _IN_FLIGHT_PER_PROCESS * max(processes, 1), counts)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir))
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  return builder.data_dir


def main(argv):
  del argv
  values = flags.FLAGS
  try:
    path = prepare(values.manual_dir, values.data_dir, values.allow_subset,
                   values.max_shorter_side)
  except (ValueError, FileNotFoundError) as e:
    raise errors.UserError(str(e)) from None
  print(f'prepared: {path} ('
        f'{describe_storage(stored_max_shorter_side(path))})')


if __name__ == '__main__':
  # Defined here, not on import: nfnets.data imports this module, and
  # nfnets/prepare_cifar10.py has a --data_dir of its own.
  flags.DEFINE_string('manual_dir', None,
                      'Folder with the two ILSVRC2012 tars.')
  flags.DEFINE_string('data_dir', None, 'tfds data dir to write.')
  flags.DEFINE_bool(
      'allow_subset', False, 'Accept tars with fewer (or more) images than '
      'ILSVRC2012 (1,281,167 train, 50,000 validation).')
  flags.DEFINE_integer(
      'max_shorter_side', 0, 'Store images whose shorter side is longer than '
      f'this many px re-encoded (JPEG quality {JPEG_QUALITY}) with that side '
      'this long, aspect kept; 0 = store the originals. 320 suits NF-ResNets '
      'and NF-RegNet-B0..B2 (docs/training.md).')
  cli.run(main, required=['manual_dir', 'data_dir'])
