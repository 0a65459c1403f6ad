"""The ILSVRC2012 tar checks of nfnets.prepare_imagenet: a missing,
malformed or truncated tar is named with what is wrong. (Preparing the tars
and reading the result: test_data.py.)"""

import os
import tarfile

import pytest

import imagenet_fixtures
from nfnets import prepare_imagenet


def test_missing_or_malformed_tars_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar not found'):
    prepare_imagenet.check_manual_dir(str(tmp_path))
  (tmp_path / 'ILSVRC2012_img_train.tar').write_bytes(b'not a tar' * 100)
  (tmp_path / 'ILSVRC2012_img_val.tar').write_bytes(b'')
  with pytest.raises(ValueError, match='ILSVRC2012_img_train.tar is not a readable tar'):
    prepare_imagenet.check_manual_dir(str(tmp_path))


def test_truncated_tars_are_refused_naming_the_tar_and_count(tmp_path):
  manual = str(tmp_path)
  imagenet_fixtures.write_manual_dir(manual, per_class=2, num_val=10)
  val = os.path.join(manual, prepare_imagenet.VAL_TAR)
  with tarfile.open(val) as archive:  # cut after the 6th image, at a boundary
    boundary = [m for m in archive][6].offset
  with open(val, 'r+b') as f:
    f.truncate(boundary)
  with pytest.raises(ValueError, match=r'ILSVRC2012_img_train.tar holds 6 '
                                       r'images, ILSVRC2012 has 1,281,167'):
    prepare_imagenet.check_counts(manual)
  counts = prepare_imagenet.check_counts(manual, allow_subset=True)
  assert counts == {prepare_imagenet.TRAIN_TAR: 6, prepare_imagenet.VAL_TAR: 6}
  with open(val, 'r+b') as f:  # cut in the middle of an image
    f.truncate(boundary - 1000)
  with pytest.raises(ValueError, match=r'ILSVRC2012_img_val.tar is damaged or '
                                       r'truncated after 6 images'):
    prepare_imagenet.check_counts(manual, allow_subset=True)


def test_train_tar_cut_at_a_class_boundary_warns_of_missing_classes(
    tmp_path, monkeypatch):
  manual = str(tmp_path)
  imagenet_fixtures.write_manual_dir(manual, per_class=2, num_val=4)
  train = os.path.join(manual, prepare_imagenet.TRAIN_TAR)
  with tarfile.open(train) as archive:  # cut before the third class's tar
    boundary = [m for m in archive][2].offset
  with open(train, 'r+b') as f:
    f.truncate(boundary)
  warnings = []
  counts = prepare_imagenet.check_counts(manual, allow_subset=True,
                                         warn=warnings.append)
  assert counts == {prepare_imagenet.TRAIN_TAR: 4, prepare_imagenet.VAL_TAR: 4}
  # tfds's label order starts with the fixture's three classes.
  assert warnings == [
      f'warning: {train} has no images of 998 of the 1000 classes '
      '(n01484850, n01491361, n01494475, n01496331, n01498041, ...); the '
      'prepared train split will have none of them.']
  # Every class present: no warning.
  monkeypatch.setattr(prepare_imagenet, 'class_names',
                      lambda: list(imagenet_fixtures.SYNSETS[:2]))
  warnings.clear()
  prepare_imagenet.check_counts(manual, allow_subset=True, warn=warnings.append)
  assert warnings == []
