"""Images/s of the ImageNet input pipeline on realistic JPEGs.

Default mode: builds ILSVRC2012-layout tars of natural-image-like JPEGs (see
tests/imagenet_fixtures.py), prepares them with tfds (array_record), then
times the full train path for each grain worker count: read record, JPEG
decode, Inception crop, flip, resize to 224, batch.

  python benchmarks/input_pipeline.py --images=2000 --workers=0,1,2

--compare: times the per-image transforms alone, the PIL path (PIL draft
decode + PIL antialiased bilinear resize, the previous default) and the
simplejpeg path (libjpeg-turbo decode + one OpenCV warp, the default),
alternately on the same JPEGs with the same crops, in one process; pin it
to one core for a per-core figure:

  taskset -c 0 python benchmarks/input_pipeline.py --compare --rounds=5

--accelerator_rate (images/s one accelerator trains at) adds how many
cores at the measured per-core rate feed it.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import ml_collections
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
import imagenet_fixtures  # pylint: disable=g-import-not-at-top
from nfnets import data  # pylint: disable=g-import-not-at-top
from nfnets import prepare_imagenet  # pylint: disable=g-import-not-at-top

_IMAGES = flags.DEFINE_integer('images', 2000, 'JPEGs to generate.')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'],
                             'grain worker counts (0 = in this process).')
_BATCH = flags.DEFINE_integer('batch', 128, 'Batch size.')
_SIZE = flags.DEFINE_integer('image_size', 224, 'Output size, px.')
_SECONDS = flags.DEFINE_float('seconds', 20, 'Measure each worker count for '
                              'this long.')
_COMPARE = flags.DEFINE_bool('compare', False, 'Time the PIL and simplejpeg '
                             'transforms alternately instead.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, '--compare: alternating rounds '
                               '(medians are reported).')
_ACCELERATOR_RATE = flags.DEFINE_float(
    'accelerator_rate', 0.0, 'Train images/s of one accelerator; > 0 adds '
    'the cores needed to feed it.')

_SHAPES = ((375, 500), (333, 500), (500, 375), (240, 320), (500, 500))


def _validate():
  for name, value in (('images', _IMAGES.value), ('batch', _BATCH.value),
                      ('rounds', _ROUNDS.value)):
    if value < 1:
      raise ValueError(f'--{name} must be >= 1, got {value}.')
  if _SIZE.value < 1:
    raise ValueError(f'--image_size must be >= 1, got {_SIZE.value}.')
  if _SECONDS.value <= 0:
    raise ValueError(f'--seconds must be > 0, got {_SECONDS.value}.')
  if not all(w.isdigit() for w in _WORKERS.value):
    raise ValueError(f'--workers {_WORKERS.value}: expected counts >= 0, '
                     'e.g. 0,1,2.')
  if _ACCELERATOR_RATE.value < 0:
    raise ValueError(f'--accelerator_rate must be >= 0, got '
                     f'{_ACCELERATOR_RATE.value}.')


def _feeding(rate_per_core: float) -> str:
  if not _ACCELERATOR_RATE.value:
    return ''
  return (f'; {_ACCELERATOR_RATE.value / rate_per_core:.1f} cores feed '
          f'{_ACCELERATOR_RATE.value:.0f} images/s')


def _train_transform(jpeg: bytes, rng, backend: str) -> np.ndarray:
  """preprocess_train's steps with a chosen decode backend."""
  height, width = data.image_size_of(jpeg)
  box = data.sample_crop_box(height, width, rng)
  flip = rng.uniform() < 0.5
  return data.crop_and_resize(jpeg, box, _SIZE.value, flip=flip,
                              backend=backend)


def _eval_transform(jpeg: bytes, rng, backend: str) -> np.ndarray:
  del rng
  height, width = data.image_size_of(jpeg)
  return data.crop_and_resize(jpeg, data.center_box(height, width, 0.875),
                              _SIZE.value, backend=backend)


def compare() -> None:
  """PIL vs simplejpeg transforms, alternating, same JPEGs and crops."""
  jpegs = [imagenet_fixtures.natural_jpeg(i, *_SHAPES[i % len(_SHAPES)])
           for i in range(_IMAGES.value)]
  print(f'{len(jpegs)} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f}'
        f' KB; {len(os.sched_getaffinity(0))} CPUs usable by this process',
        flush=True)
  transforms = {'train': _train_transform, 'eval': _eval_transform}
  rates = {}
  for round_index in range(_ROUNDS.value):
    backends = data.DECODE_BACKENDS[::-1 if round_index % 2 else 1]
    for mode, transform in transforms.items():
      for backend in backends:
        rng = np.random.default_rng(round_index)  # same crops for both
        start = time.perf_counter()
        for jpeg in jpegs:
          transform(jpeg, rng, backend)
        rates.setdefault((mode, backend), []).append(
            len(jpegs) / (time.perf_counter() - start))
    print(f'round {round_index + 1}/{_ROUNDS.value}: ' + ', '.join(
        f'{mode} {backend} {rates[mode, backend][-1]:.0f}/s'
        for mode in transforms for backend in data.DECODE_BACKENDS),
          flush=True)
  print(f'\n| {_SIZE.value} px, one process | '
        + ' | '.join(f'{b} images/s' for b in data.DECODE_BACKENDS)
        + ' | ratio |\n|---|---|---|---|')
  for mode in transforms:
    medians = [statistics.median(rates[mode, b])
               for b in data.DECODE_BACKENDS]
    print(f'| {mode} transform | ' + ' | '.join(f'{m:.0f}' for m in medians)
          + f' | {medians[0] / medians[1]:.2f} |')
  print(f'(medians of {_ROUNDS.value} alternating rounds'
        f'{_feeding(statistics.median(rates["train", "simplejpeg"]))} with '
        'the simplejpeg train transform on one core)')


def workers() -> None:
  """The grain pipeline from prepared records, per worker count."""
  root = tempfile.mkdtemp(prefix='nfnets_bench_')
  try:
    _time_workers(root)
  finally:
    shutil.rmtree(root, ignore_errors=True)


def _time_workers(root: str) -> None:
  per_class = max(1, _IMAGES.value // len(imagenet_fixtures.SYNSETS))
  start = time.time()
  imagenet_fixtures.write_manual_dir(os.path.join(root, 'manual'),
                                     per_class=per_class, num_val=10)
  prepare_imagenet.prepare(os.path.join(root, 'manual'),
                           os.path.join(root, 'data'), allow_subset=True)
  print(f'prepared {per_class * len(imagenet_fixtures.SYNSETS)} JPEGs in '
        f'{time.time() - start:.0f} s; {len(os.sched_getaffinity(0))}'
        f' CPUs usable by this process')
  print(f'| grain workers | images/s ({_SIZE.value} px, batch {_BATCH.value})'
        ' |\n|---|---|')
  for count in map(int, _WORKERS.value):
    config = ml_collections.ConfigDict(dict(
        name='imagenet2012', data_dir=os.path.join(root, 'data'),
        image_size=_SIZE.value, augment=True, eval_crop_fraction=0.875,
        num_classes=1000, num_workers=count))
    iterator = data.train_iterator(config, _BATCH.value, seed=0)
    for _ in range(2):  # warm up (worker start, first decodes)
      next(iterator)
    images, start = 0, time.time()
    while time.time() - start < _SECONDS.value:
      images += len(next(iterator)['labels'])
    rate = images / (time.time() - start)
    print(f'| {count} | {rate:.0f} |', flush=True)


def main(argv):
  del argv
  try:
    _validate()
  except ValueError as e:
    sys.exit(f'input_pipeline.py: {e}')
  if _COMPARE.value:
    compare()
  else:
    workers()


if __name__ == '__main__':
  app.run(main)
