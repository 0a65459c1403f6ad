"""Your own images: one folder per split, one subfolder per class.

  data_dir/
    train/<class>/**/*.jpg|*.jpeg|*.png    (extensions in any case)
    validation/<class>/...                 (or the config's eval_split)

The classes are the train split's subfolders sorted by name (Python string
order, the same on every machine); a class's label is its index in that
order, and every split must have the same class folders. Images may sit in
subfolders of a class folder. Entries whose name starts with '.' (e.g.
.ipynb_checkpoints, macOS ._ files) and files with other extensions are
ignored.

Scanning lists folders only (os.scandir; no file is opened or decoded), so
ImageNet-sized trees of 1.3M files scan in seconds. The records are the
encoded bytes ({'image': bytes, 'label': int, 'path': str}), which
nfnets.data decodes, crops and augments exactly as it does ImageNet's: a
file that cannot be decoded (truncated, or not an image) is skipped and
counted in training and masked out in evaluation, never an error here.
"""

import os

import numpy as np

from nfnets import errors

TRAIN_SPLIT = 'train'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
_HELP = 'see docs/own_data.md'
_NAMES_SHOWN = 5  # in messages listing folders or classes


def is_image_name(name: str) -> bool:
  """Whether a file name counts as an image: a .jpg, .jpeg or .png
  extension in any case, not hidden."""
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _listing(names) -> str:
  names = list(names)
  shown = ', '.join(names[:_NAMES_SHOWN])
  more = len(names) - _NAMES_SHOWN
  return shown + (f' and {more} more' if more > 0 else '')


def _walk_images(folder: str):
  """Yields the image files under folder (recursively, following links) as
  paths relative to it, in directory order. Hidden entries are skipped."""
  pending, seen = [''], set()
  while pending:
    relative = pending.pop()
    with os.scandir(os.path.join(folder, relative)) as entries:
      for entry in entries:
        if entry.name.startswith('.'):
          continue
        if entry.is_dir():
          if entry.is_symlink():  # a link back up the tree would never end
            real = os.path.realpath(entry.path)
            if real in seen:
              continue
            seen.add(real)
          pending.append(os.path.join(relative, entry.name))
        elif entry.is_file() and is_image_name(entry.name):
          yield os.path.join(relative, entry.name)


def find_images(folder: str) -> list[str]:
  """Paths of the image files under folder (recursively, following links),
  relative to it, sorted. Hidden entries are skipped."""
  return sorted(_walk_images(folder))


def _contains_image(folder: str) -> bool:
  """Whether folder holds an image file (stops at the first one found)."""
  return next(_walk_images(folder), None) is not None


def split_dir(data_dir: str, split: str) -> str:
  """The folder of one split; UserError if data_dir or it is missing."""
  if not data_dir:
    raise errors.UserError(
        "data.name='folder' needs data.data_dir: a folder holding train/ and "
        f'validation/, each with one subfolder of images per class ({_HELP}).')
  if not os.path.isdir(data_dir):
    what = 'is not a folder' if os.path.exists(data_dir) else 'does not exist'
    raise errors.UserError(
        f'data.data_dir {data_dir!r} {what}; give the folder holding train/ '
        f'and validation/ ({_HELP}).')
  path = os.path.join(data_dir, split)
  if not os.path.isdir(path):
    present = _subfolders(data_dir)
    raise errors.UserError(
        f'{path} does not exist: the {split!r} split needs a folder {split}/ '
        f'in data.data_dir with one subfolder per class (folders there: '
        f'{_listing(present) or "none"}; {_HELP}).')
  return path


def _subfolders(path: str) -> list[str]:
  """The names of path's visible subfolders, sorted."""
  with os.scandir(path) as entries:
    return sorted(entry.name for entry in entries
                  if entry.is_dir() and not entry.name.startswith('.'))


def class_folders(path: str) -> list[str]:
  """The class names of a split folder: its subfolders, sorted; UserError
  if it has none."""
  names = _subfolders(path)
  if not names:
    raise errors.UserError(
        f'{path} has no class folders; put each class\'s images in a '
        f'subfolder named after the class, e.g. {os.path.join(path, "cat")}'
        f'{os.sep}1.jpg ({_HELP}).')
  return names


def class_names(data_dir: str) -> list[str]:
  """The class names (label order) of the dataset in data_dir: its train
  split's class folders, sorted."""
  return class_folders(split_dir(data_dir, TRAIN_SPLIT))


def _check_same_classes(data_dir: str, split: str, classes: list[str],
                        train_classes: list[str]) -> None:
  if classes == train_classes:
    return
  only_train = sorted(set(train_classes) - set(classes))
  only_split = sorted(set(classes) - set(train_classes))
  parts = []
  if only_train:
    parts.append(f'only in {TRAIN_SPLIT}/: {_listing(only_train)}')
  if only_split:
    parts.append(f'only in {split}/: {_listing(only_split)}')
  raise errors.UserError(
      f'The class folders of {os.path.join(data_dir, TRAIN_SPLIT)} and '
      f'{os.path.join(data_dir, split)} differ ({"; ".join(parts)}); every '
      'split needs the same class folders.')


def _check_num_classes(data_dir: str, train_classes: list[str],
                       num_classes: int) -> None:
  if num_classes != len(train_classes):
    count = len(train_classes)
    raise errors.UserError(
        f'{os.path.join(data_dir, TRAIN_SPLIT)} has {count} class folders '
        f'but data.num_classes={num_classes}; set --config.data.num_classes='
        f'{count} --config.model.num_classes={count}.')


def _empty_class_error(split_path: str, empty: list[str]) -> errors.UserError:
  folders = [os.path.join(split_path, name) for name in empty]
  return errors.UserError(
      f'{len(folders)} class folder(s) hold no .jpg/.jpeg/.png images: '
      f'{_listing(folders)}; add images or remove the folder from every '
      'split.')


def check_layout(data_dir: str, splits, num_classes: int) -> list[str]:
  """The checks that need no full scan (one directory listing per split and
  per class, stopping at the first image): data_dir and every split folder
  exist, each class folder holds an image, the splits have the same class
  folders, num_classes matches. Returns the class names; raises UserError.
  """
  train_classes = class_names(data_dir)
  _check_num_classes(data_dir, train_classes, num_classes)
  for split in dict.fromkeys((TRAIN_SPLIT, *splits)):
    path = split_dir(data_dir, split)
    classes = class_folders(path)
    _check_same_classes(data_dir, split, classes, train_classes)
    empty = [name for name in classes
             if not _contains_image(os.path.join(path, name))]
    if empty:
      raise _empty_class_error(path, empty)
  return train_classes


class FileRecords:
  """Random access to a scanned split: len(records), and records[i] ->
  {'image': the file's bytes, 'label': int, 'path': str}.

  The relative paths are kept as one bytes blob and offsets, not 1.3M
  Python strings: a few tens of MB for ImageNet, cheap to send to grain's
  worker processes. A file that cannot be read (deleted since the scan, no
  permission) gives empty bytes, which the decoder counts as corrupt.
  """

  def __init__(self, root: str, relative_paths: list[str],
               labels: np.ndarray):
    self.root = os.fsencode(root)
    encoded = [os.fsencode(path) for path in relative_paths]
    self._blob = b''.join(encoded)
    self._offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(path) for path in encoded], out=self._offsets[1:])
    self.labels = np.asarray(labels, np.int32)

  def __len__(self):
    return len(self.labels)

  def path(self, index: int) -> str:
    start, end = self._offsets[index], self._offsets[index + 1]
    return os.fsdecode(os.path.join(self.root, self._blob[start:end]))

  def __getitem__(self, index):
    index = int(index)
    path = self.path(index)
    try:
      with open(path, 'rb') as f:
        image = f.read()
    except OSError:
      image = b''
    return {'image': image, 'label': int(self.labels[index]), 'path': path}


def load_split(data_dir: str, split: str, num_classes: int) -> FileRecords:
  """Scans one split: every image file of every class folder, classes in
  label order and files sorted within each; raises UserError for a layout
  check_layout refuses."""
  train_classes = class_names(data_dir)
  _check_num_classes(data_dir, train_classes, num_classes)
  path = split_dir(data_dir, split)
  _check_same_classes(data_dir, split, class_folders(path), train_classes)
  relative_paths, labels, empty = [], [], []
  for label, name in enumerate(train_classes):
    files = find_images(os.path.join(path, name))
    if not files:
      empty.append(name)
    relative_paths += [os.path.join(name, file) for file in files]
    labels.append(np.full(len(files), label, np.int32))
  if empty:
    raise _empty_class_error(path, empty)
  return FileRecords(path, relative_paths, np.concatenate(labels))
