"""Images/s per CPU core of the ImageNet decode path, full-size and stored
pre-resized, and the cores one accelerator needs at a given rate.

  python -m benchmarks.decode_rate [--images=300] [--rounds=5] \
      [--max_shorter_side=320] [--core=-1]

The JPEGs are photographs, not noise (noise compresses differently): random
crops, rescales, mirror images and recompressions of the real photographs
installed packages ship (scikit-learn's china.jpg and flower.jpg,
matplotlib's grace_hopper.jpg) with a little sensor-like grain, sized like
ImageNet's: about 414 x 356 px (width x height) on average (60% with a 500
px long side, the rest 200-500 px; 4:3, 3:2, 1:1 and 16:9, a quarter
portrait) and about 110 KB (JPEG quality 96-100). The pre-resized set is each of them as
`python -m nfnets.prepare_imagenet --max_shorter_side=N` stores it
(prepare_imagenet.cap_shorter_side).

The process pins itself to one core (os.sched_setaffinity) and times, for
each set:
- decode: nfnets.data.preprocess_train (header, Inception crop, flip,
  decode at a reduced DCT scale where the crop allows, resize to
  --image_size) and preprocess_eval (center crop --eval_crop_fraction,
  resize to --eval_image_size) over every image, decoding and resampling
  only;
- pipeline: the same images written as ILSVRC2012 tars, prepared with
  nfnets.prepare_imagenet (full-size, and --max_shorter_side), read back
  as training does with data.num_workers=0 on that one core: record
  reading, decoding and batching (--batch) by train_iterator (about two
  epochs after a warm-up batch) and one eval_batches pass. A grain worker
  process does this work, so its rate is what one decode worker delivers.
Every round times each case once per set, in alternating order, with the
same crops, so that a busy machine slows all of them alike; the table
shows medians, and the load average is printed before and after: run it
when the machine is quiet (nice -n 19 keeps it polite, and slower where
others run). Cores per GPU come from the pipeline rates.
"""

import importlib
import io
import os
import shutil
import tempfile
import time

from absl import flags
import matplotlib
import ml_collections
import numpy as np
from PIL import Image
from PIL import ImageFilter

from benchmarks import harness
from nfnets import cli
from nfnets import data
from nfnets import errors
from nfnets import prepare_imagenet
from tests import imagenet_fixtures

_IMAGES = flags.DEFINE_integer('images', 300, 'JPEGs to generate.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Alternating rounds (medians '
                               'are reported).')
_SIZE = flags.DEFINE_integer('image_size', 224, 'Train output size, px.')
_EVAL_SIZE = flags.DEFINE_integer('eval_image_size', 0, 'Eval output size, '
                                  'px; 0 = --image_size.')
_CROP = flags.DEFINE_float('eval_crop_fraction', 0.875, 'Eval center crop, '
                           'fraction of the shorter side.')
_CAP = flags.DEFINE_integer('max_shorter_side', 320, 'The pre-resized set\'s '
                            'cap on the shorter side, px.')
_CORE = flags.DEFINE_integer('core', -1, 'CPU core to run on; -1 = the first '
                             'one this process may use.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Pipeline batch size.')
_RATES = flags.DEFINE_list('accelerator_rates', ['3000', '6000'],
                           'Train images/s of one accelerator: the table '
                           'shows the cores that feed each.')

# Photographs inside installed packages (scikit-learn comes with mlxtend).
_PHOTOS = (('sklearn.datasets', 'images/china.jpg'),
           ('sklearn.datasets', 'images/flower.jpg'),
           ('matplotlib', 'sample_data/grace_hopper.jpg'))
# (long side / short side, probability) of the generated images.
_ASPECTS = ((4 / 3, 0.5), (3 / 2, 0.3), (1.0, 0.1), (16 / 9, 0.1))
_STORAGES = ('full-size', 'pre-resized')
_TRANSFORMS = ('train', 'eval')
_CASES = tuple(f'{transform} {what}' for transform in _TRANSFORMS
               for what in ('decode', 'pipeline'))


def _validate():
  for name, value in (('images', _IMAGES.value), ('rounds', _ROUNDS.value),
                      ('image_size', _SIZE.value), ('batch', _BATCH.value),
                      ('max_shorter_side', _CAP.value)):
    if value < 1:
      raise errors.UserError(f'--{name} must be >= 1, got {value}.')
  if _EVAL_SIZE.value < 0:
    raise errors.UserError(f'--eval_image_size must be >= 0, got '
                           f'{_EVAL_SIZE.value}.')
  if not 0 < _CROP.value <= 1:
    raise errors.UserError(f'--eval_crop_fraction must be in (0, 1], got '
                           f'{_CROP.value}.')
  usable = sorted(os.sched_getaffinity(0))
  if _CORE.value != -1 and _CORE.value not in usable:
    raise errors.UserError(f'--core={_CORE.value} is not a core this process '
                           f'may use ({usable}); -1 = the first of them.')
  if not all(rate.isdigit() and int(rate) > 0 for rate in _RATES.value):
    raise errors.UserError(f'--accelerator_rates {_RATES.value}: expected '
                           'images/s > 0, e.g. 3000,6000.')


def _photo_path(package: str, relative: str) -> str:
  if package == 'matplotlib':
    return os.path.join(matplotlib.get_data_path(), relative)
  module = importlib.import_module(package)
  return os.path.join(os.path.dirname(module.__file__), relative)


def photo_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """count JPEGs cut from the shipped photographs (module docstring)."""
  photos = [Image.open(_photo_path(*photo)).convert('RGB')
            for photo in _PHOTOS]
  aspects = [aspect for aspect, _ in _ASPECTS]
  weights = [weight for _, weight in _ASPECTS]
  jpegs = []
  for index in range(count):
    rng = np.random.default_rng((seed, index))
    photo = photos[index % len(photos)]
    long_side = 500 if rng.uniform() < 0.6 else int(rng.integers(200, 501))
    short_side = round(long_side / rng.choice(aspects, p=weights))
    height, width = ((short_side, long_side) if rng.uniform() < 0.75
                     else (long_side, short_side))
    # Scaled so that the crop fits, by up to 30% more; sharpened where
    # that enlarged the photograph (enlarging blurs).
    scale = max(height / photo.height, width / photo.width) * rng.uniform(
        1.0, 1.3)
    scaled = photo.resize((max(width, round(photo.width * scale)),
                           max(height, round(photo.height * scale))),
                          Image.Resampling.BICUBIC)
    if scale > 1:
      scaled = scaled.filter(ImageFilter.UnsharpMask(
          radius=2, percent=int(40 + 60 * (scale - 1)), threshold=2))
    top = int(rng.integers(0, scaled.height - height + 1))
    left = int(rng.integers(0, scaled.width - width + 1))
    pixels = np.asarray(scaled.crop((left, top, left + width, top + height)),
                        np.float32)
    pixels = pixels + rng.normal(0, rng.uniform(2, 4), pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.uniform() < 0.5:
      image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=int(rng.integers(96, 101)))
    jpegs.append(buffer.getvalue())
  return jpegs


def _summary(jpegs: list[bytes]) -> str:
  shapes = np.array([data.image_size_of(jpeg) for jpeg in jpegs])
  height, width = shapes.mean(axis=0)
  return (f'mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB, '
          f'{height:.0f} x {width:.0f} px (shorter side up to '
          f'{shapes.min(axis=1).max()} px)')


def _load() -> str:
  return 'load average ' + ' '.join(f'{x:.2f}' for x in os.getloadavg())


def _prepared(root: str, jpegs: list[bytes]) -> dict[str, str]:
  """{storage: tfds data_dir} of jpegs as ILSVRC2012 tars (train: spread
  over imagenet_fixtures.SYNSETS; validation: all of them) prepared
  full-size and with --max_shorter_side."""
  synsets = imagenet_fixtures.SYNSETS
  train = {synset: [(f'{synset}_{index}.JPEG', jpeg)
                    for index, jpeg in enumerate(jpegs)
                    if index % len(synsets) == position]
           for position, synset in enumerate(synsets)}
  manual = os.path.join(root, 'manual')
  imagenet_fixtures.write_tars(manual, train, jpegs)
  data_dirs = {}
  for storage, cap in zip(_STORAGES, (0, _CAP.value)):
    data_dirs[storage] = os.path.join(root, storage)
    prepare_imagenet.prepare(manual, data_dirs[storage], allow_subset=True,
                             max_shorter_side=cap)
  return data_dirs


def main(argv):
  del argv
  _validate()
  root = tempfile.mkdtemp(prefix='nfnets_decode_rate_')
  try:
    _measure(root)
  finally:
    shutil.rmtree(root, ignore_errors=True)


def _measure(root: str) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()  # its bars would fill the log
  core = _CORE.value if _CORE.value != -1 else min(os.sched_getaffinity(0))
  start = time.time()
  sets = {'full-size': photo_jpegs(_IMAGES.value)}
  sets['pre-resized'] = [prepare_imagenet.cap_shorter_side(jpeg, _CAP.value)
                         for jpeg in sets['full-size']]
  data_dirs = _prepared(root, sets['full-size'])
  print(f'{_IMAGES.value} photo JPEGs made and prepared in '
        f'{time.time() - start:.0f} s; full-size: '
        f'{_summary(sets["full-size"])}; pre-resized to {_CAP.value} px: '
        f'{_summary(sets["pre-resized"])}', flush=True)
  os.sched_setaffinity(0, {core})
  configs = {storage: ml_collections.ConfigDict(dict(
      name='imagenet2012', data_dir=data_dirs[storage], num_classes=1000,
      num_workers=0, image_size=_SIZE.value, eval_image_size=_EVAL_SIZE.value,
      eval_crop_fraction=_CROP.value, augment=True, random_shift_px=0))
             for storage in _STORAGES}
  sources = {storage: data.get_source(configs[storage], 'validation')
             for storage in _STORAGES}
  examples = {storage: [{'image': jpeg, 'label': 0} for jpeg in jpegs]
              for storage, jpegs in sets.items()}
  # Train pipeline: about two epochs, after a warm-up batch (grain's reader
  # threads run ahead of the consumer by about one element each).
  batches = max(4, 2 * _IMAGES.value // _BATCH.value)
  round_seed = [0]  # the round's crops, the same for both storages
  print(f'pinned to core {core}; {_load()}', flush=True)

  def measure(case, storage):
    config, rng = configs[storage], np.random.default_rng(round_seed[0])
    if case == 'train pipeline':
      iterator = data.train_iterator(config, _BATCH.value, round_seed[0])
      next(iterator)  # starts grain's reader threads
      begin = time.perf_counter()
      for _ in range(batches):
        next(iterator)
      seconds = time.perf_counter() - begin
      iterator.close()
      return batches * _BATCH.value / seconds
    begin = time.perf_counter()
    if case == 'eval pipeline':
      decoded = sum(int(batch['mask'].sum()) for batch in data.eval_batches(
          config, 'validation', _BATCH.value, sources[storage]))
      assert decoded == _IMAGES.value, decoded
    else:
      for example in examples[storage]:
        if case == 'train decode':
          out = data.preprocess_train(example, config, rng)
        else:
          out = data.preprocess_eval(example, config)
        assert out is not None  # every generated image decodes
    return _IMAGES.value / (time.perf_counter() - begin)

  def after_round(round_index, rates):
    print(f'round {round_index + 1}/{_ROUNDS.value}: ' + ', '.join(
        f'{case} {storage} {rates[case, storage][-1]:.0f}/s'
        for case in _CASES for storage in _STORAGES), flush=True)
    round_seed[0] = round_index + 1

  rates = harness.medians(harness.alternate(
      _ROUNDS.value, _CASES, _STORAGES, measure, after_round))
  targets = [int(rate) for rate in _RATES.value]
  sizes = {'train': _SIZE.value, 'eval': _EVAL_SIZE.value or _SIZE.value}
  rows = []
  for transform in _TRANSFORMS:
    for storage in _STORAGES:
      pipeline = rates[f'{transform} pipeline', storage]
      rows.append(
          [f'{transform} ({sizes[transform]} px)',
           storage if storage == 'full-size'
           else f'pre-resized ({_CAP.value} px)',
           f'{rates[f"{transform} decode", storage]:.0f}', f'{pipeline:.0f}']
          + [f'{target / pipeline:.1f}' for target in targets])
  print('\n' + harness.markdown_table(
      ['transform', 'stored', 'decode: images/s per core',
       'pipeline: images/s per core']
      + [f'cores per GPU at {target:,} images/s' for target in targets],
      rows))
  print(f'(medians of {_ROUNDS.value} alternating rounds on core {core}, '
        f'batch {_BATCH.value}; {_load()}; each training process also needs '
        'a core for its own loop)')


if __name__ == '__main__':
  cli.run(main)
