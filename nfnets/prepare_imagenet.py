"""Prepares imagenet2012 as tfds array_record from the manual download.

  python -m nfnets.prepare_imagenet --manual_dir=DIR --data_dir=DIR

DIR (manual) holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from
image-net.org. The result is read by `tfds.data_source('imagenet2012')`.
Before converting, every image of both tars is counted (headers only, a few
minutes) and a count other than ILSVRC2012's (1,281,167 train, 50,000
validation) is refused, naming the tar: a truncated download must not become
a silently smaller dataset. --allow_subset accepts other counts (tests);
a warning then names the classes that have no train images (a train tar cut
at a file boundary reads without error, just missing its last classes).

TensorFlow is not needed: tfds's imagenet2012 builder and its archive reader
only touch `tf.io.gfile.exists`, `tf.io.gfile.GFile` and
`tf.compat.as_text`, which this module provides to them for local paths
(everything else in tfds's preparation is TensorFlow-free). The tars are
checked before the (hours-long) conversion starts.
"""

import importlib.util
import os
import tarfile
import types

from absl import flags

from nfnets import cli
from nfnets import errors

TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
EXPECTED_COUNTS = {TRAIN_TAR: 1_281_167, VAL_TAR: 50_000}
# Inside the tensorflow_datasets package: one wnid per line, in label order.
LABELS_FILE = os.path.join('datasets', 'imagenet2012', 'labels.txt')


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


def prepare(manual_dir: str, data_dir: str, allow_subset: bool = False) -> str:
  """Converts the tars into array_record under data_dir; returns its path."""
  check_manual_dir(manual_dir)
  check_counts(manual_dir, allow_subset)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.download import extractor  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as builder_module  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common  # pylint: disable=g-import-not-at-top
  shim = _local_tf_shim()
  for module in (extractor, builder_module, imagenet_common):
    module.tf = shim
  builder = builder_module.Builder(data_dir=data_dir,
                                   file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir))
  return builder.data_dir


_MANUAL_DIR = flags.DEFINE_string('manual_dir', None,
                                  'Folder with the two ILSVRC2012 tars.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'tfds data dir to write.')
_ALLOW_SUBSET = flags.DEFINE_bool(
    'allow_subset', False, 'Accept tars with fewer (or more) images than '
    'ILSVRC2012 (1,281,167 train, 50,000 validation).')


def main(argv):
  del argv
  try:
    path = prepare(_MANUAL_DIR.value, _DATA_DIR.value, _ALLOW_SUBSET.value)
  except (ValueError, FileNotFoundError) as e:
    raise errors.UserError(str(e)) from None
  print(f'prepared: {path}')


if __name__ == '__main__':
  cli.run(main, required=['manual_dir', 'data_dir'])
