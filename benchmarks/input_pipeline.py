"""Images/s of the ImageNet train preprocessing on realistic JPEGs.

Builds ILSVRC2012-layout tars of natural-image-like 500x375-ish JPEGs (see
tests/imagenet_fixtures.py), prepares them with tfds (array_record), then
times the full train path: read record, JPEG decode, Inception crop, flip,
resize to 224, batch.

  python benchmarks/input_pipeline.py --images=2000 --workers=0,2
"""

import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import ml_collections

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
import imagenet_fixtures  # pylint: disable=g-import-not-at-top
from nfnets import data  # pylint: disable=g-import-not-at-top
from nfnets import prepare_imagenet  # pylint: disable=g-import-not-at-top

_IMAGES = flags.DEFINE_integer('images', 2000, 'Train images to generate.')
_WORKERS = flags.DEFINE_list('workers', ['0', '2'], 'grain worker counts.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Batch size.')
_SECONDS = flags.DEFINE_float('seconds', 20, 'Measure for this long.')


def main(argv):
  del argv
  root = tempfile.mkdtemp(prefix='nfnets_bench_')
  per_class = max(1, _IMAGES.value // len(imagenet_fixtures.SYNSETS))
  start = time.time()
  imagenet_fixtures.write_manual_dir(os.path.join(root, 'manual'),
                                     per_class=per_class, num_val=10)
  prepare_imagenet.prepare(os.path.join(root, 'manual'),
                           os.path.join(root, 'data'))
  print(f'prepared {per_class * len(imagenet_fixtures.SYNSETS)} JPEGs in '
        f'{time.time() - start:.0f} s ({root})')
  for workers in map(int, _WORKERS.value):
    config = ml_collections.ConfigDict(dict(
        name='imagenet2012', data_dir=os.path.join(root, 'data'),
        image_size=224, augment=True, eval_crop_fraction=0.875,
        num_classes=1000, num_workers=workers))
    iterator = data.train_iterator(config, _BATCH.value, seed=0)
    for _ in range(2):  # warm up (worker start, first decodes)
      next(iterator)
    images, start = 0, time.time()
    while time.time() - start < _SECONDS.value:
      images += len(next(iterator)['labels'])
    rate = images / (time.time() - start)
    print(f'workers={workers}: {rate:.0f} images/s '
          f'({images} images, batch {_BATCH.value}, 224 px, {os.cpu_count()} CPUs)')


if __name__ == '__main__':
  app.run(main)
