"""Images/s of the ImageNet input pipeline on realistic JPEGs.

Default mode: builds ILSVRC2012-layout tars of natural-image-like JPEGs (see
tests/imagenet_fixtures.py), prepares them with tfds (array_record), then
times the full train path for each grain worker count: read record, JPEG
decode, Inception crop, flip, resize to 224, batch.

  python -m benchmarks.input_pipeline --images=2000 --workers=0,1,2

--compare: times the per-image transforms alone, the PIL path (PIL draft
decode + PIL antialiased bilinear resize) and the
simplejpeg path (libjpeg-turbo decode + one OpenCV warp, the default),
alternately on the same JPEGs with the same crops, in one process; pin it
to one core for a per-core figure:

  taskset -c 0 python -m benchmarks.input_pipeline --compare --rounds=5

--accelerator_rate (images/s one accelerator trains at) adds how many
cores at the measured per-core rate feed it.

--eval: times whole evaluation passes (nfnets.data.eval_batches: decode,
center crop, resize, padded batches) over --images validation JPEGs for
each worker count (-1 = auto, resolve_num_workers), alternating over
--rounds; worker start-up is part of every pass:

  python -m benchmarks.input_pipeline --eval --images=600 --workers=0,-1,2

Per-core decode rates on photo-like JPEGs: benchmarks/decode_rate.py.
"""

import shutil
import tempfile
import time

from absl import flags
import ml_collections
import numpy as np

from benchmarks import harness
from nfnets import cli
from nfnets import data
from nfnets import errors
from tests import imagenet_fixtures

_IMAGES = flags.DEFINE_integer('images', 2000, 'JPEGs to generate.')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'],
                             'grain worker counts (0 = in this process; '
                             '-1 = auto, --eval only).')
_BATCH = flags.DEFINE_integer('batch', 128, 'Batch size.')
_SIZE = flags.DEFINE_integer('image_size', 224, 'Output size, px.')
_SECONDS = flags.DEFINE_float('seconds', 20, 'Measure each worker count for '
                              'this long.')
_COMPARE = flags.DEFINE_bool('compare', False, 'Time the PIL and simplejpeg '
                             'transforms alternately instead.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, '--compare, --eval: alternating '
                               'rounds (medians are reported).')
_EVAL = flags.DEFINE_bool('eval', False, 'Time evaluation passes per worker '
                          'count instead.')
_ACCELERATOR_RATE = flags.DEFINE_float(
    'accelerator_rate', 0.0, 'Train images/s of one accelerator; > 0 adds '
    'the cores needed to feed it.')

_SHAPES = ((375, 500), (333, 500), (500, 375), (240, 320), (500, 500))


def _validate():
  for name, value in (('images', _IMAGES.value), ('batch', _BATCH.value),
                      ('rounds', _ROUNDS.value)):
    if value < 1:
      raise errors.UserError(f'--{name} must be >= 1, got {value}.')
  if _SIZE.value < 1:
    raise errors.UserError(f'--image_size must be >= 1, got {_SIZE.value}.')
  if _SECONDS.value <= 0:
    raise errors.UserError(f'--seconds must be > 0, got {_SECONDS.value}.')
  allowed = ('-1',) if _EVAL.value else ()
  if not all(w.isdigit() or w in allowed for w in _WORKERS.value):
    auto = ' (or -1 = auto)' if _EVAL.value else ''
    raise errors.UserError(f'--workers {_WORKERS.value}: expected counts '
                           f'>= 0, e.g. 0,1,2{auto}.')
  if _ACCELERATOR_RATE.value < 0:
    raise errors.UserError(f'--accelerator_rate must be >= 0, got '
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
        f' KB; {harness.cpu_count()} CPUs usable by this process',
        flush=True)
  transforms = {'train': _train_transform, 'eval': _eval_transform}
  round_seed = [0]  # the round's crops, the same for both backends

  def measure(mode, backend):
    rng = np.random.default_rng(round_seed[0])
    start = time.perf_counter()
    for jpeg in jpegs:
      transforms[mode](jpeg, rng, backend)
    return len(jpegs) / (time.perf_counter() - start)

  def after_round(round_index, rates):
    print(f'round {round_index + 1}/{_ROUNDS.value}: ' + ', '.join(
        f'{mode} {backend} {rates[mode, backend][-1]:.0f}/s'
        for mode in transforms for backend in data.DECODE_BACKENDS),
          flush=True)
    round_seed[0] = round_index + 1

  rates = harness.alternate(_ROUNDS.value, list(transforms),
                            data.DECODE_BACKENDS, measure, after_round)
  medians = harness.medians(rates)
  rows = []
  for mode in transforms:
    rates_by_backend = [medians[mode, b] for b in data.DECODE_BACKENDS]
    rows.append([f'{mode} transform']
                + [f'{m:.0f}' for m in rates_by_backend]
                + [f'{rates_by_backend[0] / rates_by_backend[1]:.2f}'])
  print('\n' + harness.markdown_table(
      [f'{_SIZE.value} px, one process']
      + [f'{b} images/s' for b in data.DECODE_BACKENDS] + ['ratio'], rows))
  print(f'(medians of {_ROUNDS.value} alternating rounds'
        f'{_feeding(medians["train", "simplejpeg"])} with '
        'the simplejpeg train transform on one core)')


def workers() -> None:
  """The grain pipeline from prepared records, per worker count."""
  root = tempfile.mkdtemp(prefix='nfnets_bench_')
  try:
    _time_workers(root)
  finally:
    shutil.rmtree(root, ignore_errors=True)


def _time_workers(root: str) -> None:
  start = time.time()
  data_dir, images = harness.prepare_jpegs(root, _IMAGES.value, num_val=10)
  print(f'prepared {images} JPEGs in {time.time() - start:.0f} s; '
        f'{harness.cpu_count()} CPUs usable by this process')
  print(harness.markdown_table(
      ['grain workers', f'images/s ({_SIZE.value} px, batch {_BATCH.value})']))
  for count in map(int, _WORKERS.value):
    config = ml_collections.ConfigDict(dict(
        name='imagenet2012', data_dir=data_dir,
        image_size=_SIZE.value, augment=True, eval_crop_fraction=0.875,
        num_classes=1000, num_workers=count))
    iterator = data.train_iterator(config, _BATCH.value, seed=0)
    for _ in range(2):  # warm up (worker start, first decodes)
      next(iterator)
    images, start = 0, time.time()
    while time.time() - start < _SECONDS.value:
      images += len(next(iterator)['labels'])
    rate = images / (time.time() - start)
    print(harness.table_row([count, f'{rate:.0f}']), flush=True)


def eval_passes() -> None:
  """Seconds per evaluation pass per worker count, on prepared records."""
  root = tempfile.mkdtemp(prefix='nfnets_bench_')
  try:
    _time_eval_passes(root)
  finally:
    shutil.rmtree(root, ignore_errors=True)


def _time_eval_passes(root: str) -> None:
  start = time.time()
  data_dir, _ = harness.prepare_jpegs(root, 3, num_val=_IMAGES.value)
  print(f'prepared {_IMAGES.value} validation JPEGs in '
        f'{time.time() - start:.0f} s; {harness.cpu_count()} CPUs usable by '
        'this process', flush=True)
  counts = [int(w) for w in _WORKERS.value]
  configs = {count: ml_collections.ConfigDict(dict(
      name='imagenet2012', data_dir=data_dir, image_size=_SIZE.value,
      augment=True, eval_crop_fraction=0.875, num_classes=1000,
      num_workers=count)) for count in counts}
  sources = {count: data.get_source(configs[count], 'validation')
             for count in counts}

  def measure(case, count):
    del case
    begin = time.perf_counter()
    batches = data.eval_batches(configs[count], 'validation', _BATCH.value,
                                sources[count])
    decoded = sum(int(batch['mask'].sum()) for batch in batches)
    assert decoded == _IMAGES.value, decoded
    return time.perf_counter() - begin

  def after_round(round_index, seconds):
    print(f'round {round_index + 1}/{_ROUNDS.value}: ' + ', '.join(
        f'{count} workers {seconds["pass", count][-1]:.2f} s'
        for count in counts), flush=True)

  medians = harness.medians(harness.alternate(
      _ROUNDS.value, ['pass'], counts, measure, after_round))
  print('\n' + harness.markdown_table(
      ['data.num_workers', 'workers', f's per pass ({_IMAGES.value} images, '
       f'{_SIZE.value} px, batch {_BATCH.value})', 'images/s'],
      [[count, data.resolve_num_workers(configs[count]),
        f'{medians["pass", count]:.2f}',
        f'{_IMAGES.value / medians["pass", count]:.0f}'] for count in counts]))
  print(f'(medians of {_ROUNDS.value} alternating rounds)')


def main(argv):
  del argv
  _validate()
  if _COMPARE.value:
    compare()
  elif _EVAL.value:
    eval_passes()
  else:
    workers()


if __name__ == '__main__':
  cli.run(main)
