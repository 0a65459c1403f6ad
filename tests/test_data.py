"""Input pipelines (nfnets.data): ImageNet prepared from tars in the real
layout, MNIST, fake; the JPEG decode path. (The tar checks:
test_prepare_imagenet.py.)"""

import hashlib
import io
import re

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

import helpers
import imagenet_fixtures
from nfnets import data
from nfnets import errors
from nfnets import prepare_imagenet

CORRUPT = 'n01443537_1.JPEG'


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('imagenet')
  imagenet_fixtures.write_manual_dir(str(root / 'manual'), per_class=4,
                                     num_val=10, corrupt=CORRUPT)
  prepare_imagenet.prepare(str(root / 'manual'), str(root / 'data'),
                           allow_subset=True)
  return str(root / 'data')


def _imagenet_config(data_dir, **overrides):
  config = ml_collections.ConfigDict(dict(
      name='imagenet2012', data_dir=data_dir, image_size=64, augment=True,
      eval_crop_fraction=0.875, num_classes=1000, num_workers=0))
  config.update(overrides)
  return config


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _digest(images):
  return hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()


def test_prepared_imagenet_gives_augmented_uint8_batches(imagenet_dir):
  config = _imagenet_config(imagenet_dir)
  source = data.get_source(config, 'train')
  assert len(source.records) == 12
  assert len(data.get_source(config, 'validation').records) == 10
  batch = next(data.train_iterator(config, 8, seed=0))
  assert batch['images'].shape == (8, 64, 64, 3)
  assert batch['images'].dtype == np.uint8
  assert batch['labels'].dtype == np.int32
  assert set(batch['labels']) <= {0, 1, 2}
  # Real pixel content, not padding: full range and per-image variation.
  assert batch['images'].min() < 30 and batch['images'].max() > 225
  assert len({_digest(image) for image in batch['images']}) == 8


def test_same_seed_same_batches_other_seed_differs(imagenet_dir):
  config = _imagenet_config(imagenet_dir)
  first = _take(data.train_iterator(config, 4, seed=1), 5)
  again = _take(data.train_iterator(config, 4, seed=1), 5)
  other = _take(data.train_iterator(config, 4, seed=2), 5)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['images'], b['images'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
  assert any(not np.array_equal(a['images'], b['images'])
             for a, b in zip(first, other))


def test_resumed_iterator_sees_the_same_examples(imagenet_dir):
  config = _imagenet_config(imagenet_dir)
  iterator = data.train_iterator(config, 4, seed=3)
  _take(iterator, 3)
  state = iterator.get_state()
  expected = _take(iterator, 6)  # crosses epoch boundaries
  resumed = data.train_iterator(config, 4, seed=3)
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 6)):
    np.testing.assert_array_equal(a['images'], b['images'])
    np.testing.assert_array_equal(a['labels'], b['labels'])


def _as_process(monkeypatch, index, count):
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)


def test_processes_read_disjoint_training_shards(monkeypatch):
  config = ml_collections.ConfigDict(dict(
      name='fake', image_size=32, num_classes=5, augment=False,
      fake_train_size=30, fake_eval_size=7, num_workers=0))
  seen = []
  for index in range(3):
    _as_process(monkeypatch, index, 3)
    # 10 examples per shard; 5 batches of 2 per process = one epoch.
    batches = _take(data.train_iterator(config, 6, seed=0), 5)
    seen.append({_digest(image) for b in batches for image in b['images']})
  assert all(len(s) == 10 for s in seen)
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_eval_covers_every_example_exactly_once_with_padding(
    imagenet_dir, monkeypatch):
  config = _imagenet_config(imagenet_dir)
  everything = []
  batch_counts = []
  for index in range(3):
    _as_process(monkeypatch, index, 3)
    batches = list(data.eval_batches(config, 'validation', 6))
    batch_counts.append(len(batches))
    for b in batches:
      assert b['images'].shape == (2, 64, 64, 3)
      everything += [_digest(image) for image, keep in
                     zip(b['images'], b['mask']) if keep]
  assert len(set(batch_counts)) == 1  # processes stay in lockstep
  _as_process(monkeypatch, 0, 1)
  single = [_digest(image) for b in data.eval_batches(config, 'validation', 4)
            for image, keep in zip(b['images'], b['mask']) if keep]
  assert len(single) == 10 and sorted(everything) == sorted(single)


def test_corrupt_jpeg_is_skipped_and_counted(imagenet_dir):
  config = _imagenet_config(imagenet_dir)
  before = data.CorruptImageCounter.count
  batches = _take(data.train_iterator(config, 6, seed=0), 6)  # 3 epochs
  assert data.CorruptImageCounter.count > before
  for b in batches:
    assert b['images'].shape == (6, 64, 64, 3)
  # Class 1 lost one of its 4 images: 11 distinct examples per epoch remain.
  labels = np.concatenate([b['labels'] for b in batches])
  assert np.sum(labels == 1) < np.sum(labels == 0)


def test_eval_preprocessing_is_a_center_crop():
  image = np.zeros((100, 200, 3), np.uint8)
  image[:, 50:150] = 255  # the central square
  config = ml_collections.ConfigDict(dict(image_size=32, augment=True,
                                          eval_crop_fraction=1.0))
  out = data.preprocess_eval({'image': image, 'label': 0}, config)
  assert out.shape == (32, 32, 3) and out.min() == 255


def test_random_resized_crop_respects_area_and_aspect():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, height, width = data.sample_crop_box(375, 500, rng)
    assert 0 <= top and top + height <= 375 and 0 <= left and left + width <= 500
    assert 0.079 <= height * width / (375 * 500) <= 1.0
    assert 3 / 4 - 0.02 <= width / height <= 4 / 3 + 0.02
  # Impossible aspect ratios fall back to the central square.
  assert data.sample_crop_box(10, 1000, rng, aspect_range=(0.001, 0.002)) == (
      0, 495, 10, 10)


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match='python -m nfnets.prepare_imagenet') as info:
    data.get_source(_imagenet_config(str(tmp_path)), 'train')
  assert 'delete' not in str(info.value)


def test_train_py_on_unprepared_imagenet_prints_only_our_line(tmp_path):
  """tfds's own log lines about the missing files do not precede ours."""
  result = helpers.run(['train.py', '--config=configs/nf_resnet50.py',
                        f'--workdir={tmp_path / "run"}',
                        f'--config.data.data_dir={tmp_path / "tfds"}'],
                       check=False, timeout=300)
  assert result.returncode == 2, result.stderr
  lines = (result.stdout + result.stderr).splitlines()
  assert lines[-1].startswith('train.py: error: imagenet2012 (train) is not '
                              'prepared in data_dir='), lines
  noise = [l for l in lines if 'WARNING' in l or 'tensorflow' in l.lower()
           or re.match(r'[IWEF]\d{4} ', l)]  # absl's log line prefix
  assert not noise, lines


def test_mnist_is_real_and_split_fixed():
  config = ml_collections.ConfigDict(dict(name='mnist'))
  train, test = data.get_source(config, 'train'), data.get_source(config, 'test')
  assert len(train.records) == 4000 and len(test.records) == 1000
  assert np.bincount(test.records.labels).tolist() == [100] * 10
  train_digests = {_digest(im) for im in train.records.images}
  assert not any(_digest(im) in train_digests for im in test.records.images)
  image = train.records[0]['image']
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_batch_not_divisible_by_devices(monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  with pytest.raises(ValueError, match='Global batch size 12 is not divisible by the 8 devices'):
    data.local_batch_size(12)


def test_unknown_dataset():
  with pytest.raises(ValueError, match="Unknown dataset 'svhn'.*cifar10"):
    data.get_source(ml_collections.ConfigDict(dict(name='svhn')), 'train')


# --- The simplejpeg + OpenCV decode path against the PIL reference. ---

_FIXTURE_SHAPES = ((375, 500), (333, 500), (500, 375), (240, 320), (500, 500))


def _encode(image, fmt, **options):
  """Encoded bytes of a PIL image or a uint8 array."""
  buffer = io.BytesIO()
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  image.save(buffer, format=fmt, **options)
  return buffer.getvalue()


def _mean_abs_diff(a, b):
  return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def test_fast_decode_matches_pil_geometry():
  rng = np.random.default_rng(0)
  diffs, shifted = [], []
  for seed, shape in enumerate(_FIXTURE_SHAPES):
    jpeg = imagenet_fixtures.natural_jpeg(seed, *shape)
    assert data.image_size_of(jpeg) == shape
    for box in (data.center_box(*shape, 0.875),
                data.sample_crop_box(*shape, rng),
                data.sample_crop_box(*shape, rng)):
      fast = data.crop_and_resize(jpeg, box, 224)
      assert fast.shape == (224, 224, 3) and fast.dtype == np.uint8
      diffs.append(_mean_abs_diff(
          fast, data.crop_and_resize(jpeg, box, 224, backend='pil')))
      top, left, height, width = box
      moved = (top, left + 6, height, width) if left + 6 + width <= shape[
          1] else (top, left - 6, height, width)
      shifted.append(_mean_abs_diff(
          fast, data.crop_and_resize(jpeg, moved, 224, backend='pil')))
  # Observed: 0.3-1.3 levels per crop (bilinear vs PIL's antialiased
  # bilinear); the same crop moved by 6 px differs by several times more.
  assert max(diffs) < 2.0, diffs
  assert np.mean(diffs) < 1.0, diffs
  assert min(s - d for s, d in zip(shifted, diffs)) > 1.0, (diffs, shifted)


def test_decoding_uses_a_reduced_dct_scale_when_the_crop_allows():
  jpeg = imagenet_fixtures.natural_jpeg(7, 500, 500)
  # Full 500 px to 64 px: a 1/4 scale (125 px) still covers 64 px.
  pixels, scale_y, scale_x = data._decode_for_crop(jpeg, (0, 0, 500, 500), 64)
  assert pixels.shape == (125, 125, 3) and scale_y == scale_x == 0.25
  # A 300 px crop to 224 px needs every pixel: full size.
  pixels, _, _ = data._decode_for_crop(jpeg, (0, 0, 300, 300), 224)
  assert pixels.shape == (500, 500, 3)
  reference = data.crop_and_resize(jpeg, (0, 0, 500, 500), 64, backend='pil')
  assert _mean_abs_diff(data.crop_and_resize(jpeg, (0, 0, 500, 500), 64),
                        reference) < 4.0


def test_flip_mirrors_the_crop():
  jpeg = imagenet_fixtures.natural_jpeg(3, 240, 320)
  box = (20, 30, 150, 200)
  for backend in data.DECODE_BACKENDS:
    plain = data.crop_and_resize(jpeg, box, 64, backend=backend)
    flipped = data.crop_and_resize(jpeg, box, 64, flip=True, backend=backend)
    # The warp's fixed-point coordinates may round 1 level differently.
    assert np.abs(flipped[:, ::-1].astype(int) - plain).max() <= 1
    assert _mean_abs_diff(flipped, plain) > 5  # the crop is not symmetric
  array = np.asarray(Image.open(io.BytesIO(jpeg)))
  np.testing.assert_array_equal(
      data.crop_and_resize(array, (0, 0, 64, 64), 64, flip=True),
      array[:64, :64][:, ::-1])


def test_grayscale_cmyk_jpeg_and_png_inputs():
  rgb = np.asarray(Image.open(io.BytesIO(
      imagenet_fixtures.natural_jpeg(4, 120, 160))))
  gray = np.asarray(Image.fromarray(rgb).convert('L'))
  inputs = {
      'gray jpeg': _encode(gray, 'JPEG', quality=95),
      'cmyk jpeg': _encode(Image.fromarray(rgb).convert('CMYK'), 'JPEG',
                           quality=95),
      'rgb png': _encode(rgb, 'PNG'),
      'rgba png': _encode(np.dstack([rgb, np.full(rgb.shape[:2], 255,
                                                  np.uint8)]), 'PNG'),
  }
  box = (10, 20, 100, 120)
  for name, encoded in inputs.items():
    out = data.crop_and_resize(encoded, box, 48)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8, name
    reference = data.crop_and_resize(encoded, box, 48, backend='pil')
    assert _mean_abs_diff(out, reference) < 2.0, name
    if name == 'gray jpeg':
      assert (out[..., 0] == out[..., 1]).all() and (
          out[..., 1] == out[..., 2]).all()
    else:  # the colour survived the decoder
      target = data.crop_and_resize(rgb, box, 48)
      assert _mean_abs_diff(out, target) < 3.0, name


def test_undecodable_bytes_are_counted_and_skipped():
  jpeg = imagenet_fixtures.natural_jpeg(5, 240, 320)
  config = ml_collections.ConfigDict(dict(image_size=32, augment=True,
                                          eval_crop_fraction=0.875))
  broken = {'garbage after header': jpeg[:200] + b'\x00garbage' * 50,
            'truncated': jpeg[:len(jpeg) // 2],
            'not an image': b'hello' * 40,
            'empty': b''}
  rng = np.random.default_rng(0)
  for name, payload in broken.items():
    before = data.CorruptImageCounter.count
    assert data.preprocess_train({'image': payload, 'label': 3}, config,
                                 rng) is None, name
    assert data.preprocess_eval({'image': payload, 'label': 3},
                                config) is None, name
    assert data.CorruptImageCounter.count == before + 2, name


def test_train_preprocessing_is_crop_then_optional_flip():
  jpeg = imagenet_fixtures.natural_jpeg(6, 333, 500)
  config = ml_collections.ConfigDict(dict(image_size=32, augment=True))
  flips = []
  for seed in range(8):
    out = data.preprocess_train({'image': jpeg, 'label': 1}, config,
                                np.random.default_rng(seed))
    rng = np.random.default_rng(seed)  # the same draws, made by hand
    box = data.sample_crop_box(333, 500, rng)
    flips.append(bool(rng.uniform() < 0.5))
    np.testing.assert_array_equal(
        out['images'], data.crop_and_resize(jpeg, box, 32, flip=flips[-1]))
    assert out['labels'] == 1
  assert 0 < sum(flips) < len(flips)


def test_unknown_decode_backend():
  with pytest.raises(ValueError, match="Unknown decode backend 'cv2'"):
    data.crop_and_resize(b'', (0, 0, 1, 1), 8, backend='cv2')


def test_in_memory_batches_cover_each_epoch_and_resume_exactly():
  config = ml_collections.ConfigDict(dict(
      name='fake', image_size=32, num_classes=5, augment=True,
      random_shift_px=2, fake_train_size=30, fake_eval_size=7,
      num_workers=0))
  source = data.get_source(config, 'train')
  iterator = data.train_iterator(config, 6, seed=3, source=source)
  batches = _take(iterator, 10)  # two epochs of 30
  # Labels identify nothing; the unaugmented gather order does: rebuild it.
  order = np.concatenate([np.random.default_rng((3, e)).permutation(30)
                          for e in range(2)])
  np.testing.assert_array_equal(
      np.concatenate([b['labels'] for b in batches]),
      source.records.labels[order])
  assert sorted(order[:30]) == list(range(30))
  resumed = data.train_iterator(config, 6, seed=3, source=source)
  resumed.set_state({'batches_served': 7})
  for expected in batches[7:]:
    got = next(resumed)
    np.testing.assert_array_equal(got['images'], expected['images'])
  # Shifts and flips move pixels: augmented images differ from the source.
  assert not np.array_equal(batches[0]['images'],
                            source.records.images[order[:6]])


def test_prefetcher_state_is_that_of_the_last_returned_batch():
  config = ml_collections.ConfigDict(dict(
      name='fake', image_size=32, num_classes=5, augment=False,
      fake_train_size=30, fake_eval_size=7, num_workers=0))
  plain = _take(data.train_iterator(config, 6, seed=0), 8)
  prefetcher = data.Prefetcher(data.train_iterator(config, 6, seed=0), 3)
  _take(prefetcher, 3)
  state = prefetcher.get_state()  # batches 3..5 may already be buffered
  prefetcher.close()
  resumed = data.train_iterator(config, 6, seed=0)
  resumed.set_state(state)
  for expected in plain[3:]:
    np.testing.assert_array_equal(next(resumed)['images'], expected['images'])


# --- Decode workers: how many, and evaluation decoded by them. ---


@pytest.fixture
def worker_rule(monkeypatch):
  """resolve_num_workers with faked cores and processes: call
  set_cores(n) and set_processes(list of 'same' / 'other host' /
  'other cores' for the other processes)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data.processes_sharing_cores.cache_clear()
  cores = {'set': set(range(2))}
  monkeypatch.setattr(data.os, 'sched_getaffinity',
                      lambda pid: cores['set'])
  others = {'kinds': []}

  def gather(key):
    flipped = {'same': None, 'other host': 0, 'other cores': 2}
    rows = [key]
    for kind in others['kinds']:
      row = key.copy()
      if flipped[kind] is not None:
        row[flipped[kind]] ^= 1
      rows.append(row)
    return np.stack(rows)

  monkeypatch.setattr(multihost_utils, 'process_allgather', gather)

  def set_processes(kinds):
    data.processes_sharing_cores.cache_clear()
    others['kinds'] = kinds
    _as_process(monkeypatch, 0, 1 + len(kinds))

  yield (lambda n: cores.update(set=set(range(n)))), set_processes
  data.processes_sharing_cores.cache_clear()


def test_auto_workers_are_the_processes_share_of_its_cores_less_one(
    worker_rule):
  set_cores, set_processes = worker_rule
  auto = ml_collections.ConfigDict(dict(name='imagenet2012', num_workers=-1))
  set_cores(16)
  assert data.resolve_num_workers(auto) == 15
  set_cores(112)  # a DGX H100: one process, or one per GPU
  assert data.resolve_num_workers(auto) == 111
  set_processes(['same'] * 7)
  assert data.resolve_num_workers(auto) == 13
  set_processes(['same'] * 3 + ['other host'] * 4)  # 2 hosts, 4 each
  assert data.resolve_num_workers(auto) == 27
  set_cores(14)  # each process pinned to 14 cores of its own
  set_processes(['other cores'] * 7)
  assert data.resolve_num_workers(auto) == 13
  set_cores(1)
  set_processes([])
  assert data.resolve_num_workers(auto) == 1  # at least one
  for name in data.IN_MEMORY_SOURCES:  # never workers
    assert data.resolve_num_workers(
        ml_collections.ConfigDict(dict(name=name, num_workers=-1))) == 0
    assert data.resolve_num_workers(
        ml_collections.ConfigDict(dict(name=name, num_workers=4))) == 0
  for explicit in (0, 1, 5):
    assert data.resolve_num_workers(ml_collections.ConfigDict(
        dict(name='imagenet2012', num_workers=explicit))) == explicit
  for bad in (-2, 1.5, True, '4'):
    with pytest.raises(ValueError, match=re.escape(
        f'data.num_workers must be -1 (one per CPU core this process may '
        f'use, less one), 0 (decode in the training process) or a number of '
        f'worker processes, got {bad!r}.')):
      data.resolve_num_workers(ml_collections.ConfigDict(
          dict(name='imagenet2012', num_workers=bad)))


def test_eval_with_workers_gives_the_same_batches_as_without(imagenet_dir):
  """The train split holds the corrupt image; 12 examples in batches of 5:
  the last one has 3 rows of padding."""
  passes = {}
  for workers in (0, 2):
    config = _imagenet_config(imagenet_dir, num_workers=workers)
    before = data.CorruptImageCounter.count
    passes[workers] = list(data.eval_batches(config, 'train', 5))
    assert data.CorruptImageCounter.count == before + 1  # counted here
  plain, parallel = passes[0], passes[2]
  assert len(plain) == len(parallel) == 3
  for a, b in zip(plain, parallel):
    assert a.keys() == b.keys() == {'images', 'labels', 'mask'}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  masks = np.concatenate([b['mask'] for b in plain])
  assert masks.sum() == 11 and not masks[-3:].any()
  labels = np.concatenate([b['labels'] for b in plain])
  assert sorted(np.bincount(labels[masks]).tolist()) == [3, 4, 4]
  images = np.concatenate([b['images'] for b in plain])
  assert (images[~masks] == 0).all() and (labels[~masks] == 0).all()
  assert len({_digest(image) for image in images[masks]}) == 11
  # The same pixels as preprocessing each example by itself.
  config = _imagenet_config(imagenet_dir)
  source = data.get_source(config, 'train')
  first = source.records[0]
  np.testing.assert_array_equal(images[0], data.preprocess_eval(first, config))


def test_describe_pipeline_says_what_decodes(imagenet_dir, worker_rule):
  set_cores, _ = worker_rule
  set_cores(4)
  config = _imagenet_config(imagenet_dir, num_workers=-1)
  source = data.get_source(config, 'validation')
  assert data.stored_max_shorter_side(source) == 0  # prepared without a cap
  assert data.describe_pipeline(config, source) == (
      'ImageNet JPEGs, stored full-size, 3 decode workers')
  config.num_workers = 0
  assert data.describe_pipeline(config, source) == (
      'ImageNet JPEGs, stored full-size, decoded in the training process')
  mnist = ml_collections.ConfigDict(dict(name='mnist', num_workers=-1))
  assert data.describe_pipeline(mnist, data.get_source(mnist, 'test')) == (
      'mnist arrays in memory, batches cut in the training process')


def test_close_iterator_stops_the_train_workers(imagenet_dir):
  config = _imagenet_config(imagenet_dir, num_workers=1)
  iterator = data.train_iterator(config, 4, seed=0)
  assert next(iterator)['images'].shape == (4, 64, 64, 3)
  data.close_iterator(iterator)
  with pytest.raises(ValueError):  # grain's iterator is closed
    next(iterator)
  prefetcher = data.Prefetcher(data.train_iterator(
      _imagenet_config(imagenet_dir), 4, seed=0))
  next(prefetcher)
  data.close_iterator(prefetcher)  # its thread, then grain's reader threads
  assert prefetcher._thread is None


def test_resume_keeps_the_checkpoints_decode_worker_count(monkeypatch):
  # grain's state is per worker: another count cannot restore it (it fails
  # deep inside grain), and would give another batch order anyway.
  config = ml_collections.ConfigDict(dict(name='imagenet2012',
                                          num_workers=3))
  saved = data.with_worker_count({'next_index': 7}, config)
  assert saved == {'next_index': 7, data.WORKERS_STATE_KEY: 3}
  same, state, note = data.resume_data_config(config, saved)
  assert same.num_workers == 3 and state == {'next_index': 7} and not note
  config.num_workers = 2
  with pytest.raises(errors.UserError, match=r'from 3 decode workers; resume '
                     r'with --config.data.num_workers=3'):
    data.resume_data_config(config, saved)
  config.num_workers = -1  # auto: takes the checkpoint's count
  monkeypatch.setattr(data, 'resolve_num_workers',
                      lambda c: 5 if c.num_workers == -1 else c.num_workers)
  resumed, state, note = data.resume_data_config(config, saved)
  assert resumed.num_workers == 3 and config.num_workers == -1
  assert state == {'next_index': 7} and "checkpoint's 3 decode workers" in note
  # Checkpoints from before the count was stored: taken as they are.
  assert data.resume_data_config(config, {'next_index': 1}) == (
      config, {'next_index': 1}, None)


def test_a_training_split_of_only_undecodable_files_stops(monkeypatch):
  monkeypatch.setattr(data._DecodeTally, 'decoded', 0)
  monkeypatch.setattr(data._DecodeTally, 'skipped', 0)
  config = ml_collections.ConfigDict(dict(
      name='folder', data_dir='/images', image_size=32, augment=True))
  rng = np.random.default_rng(0)
  example = {'image': b'not an image', 'label': 0}
  for _ in range(data._MAX_FAILURES_BEFORE_ANY_IMAGE - 1):
    assert data._preprocess_train_random(example, rng, config) is None
  with pytest.raises(errors.UserError, match=r'None of the first 200 '
                     r"training images could be decoded \(data.name='folder'"):
    data._preprocess_train_random(example, rng, config)
  # Once any image decoded, failures are skipped however many there are.
  monkeypatch.setattr(data._DecodeTally, 'decoded', 1)
  assert data._preprocess_train_random(example, rng, config) is None
