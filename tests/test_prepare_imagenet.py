"""nfnets.prepare_imagenet: the ILSVRC2012 tar checks (a missing, malformed
or truncated tar is named with what is wrong), images stored with a capped
shorter side, the builder's CMYK and PNG images converted without
TensorFlow. (Reading a full-size preparation: test_data.py.)"""

import io
import json
import os
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest

import helpers
import imagenet_fixtures
from nfnets import data
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


def _train_tar_images(manual: str) -> dict:
  """{file name: bytes} of every image in an ILSVRC2012 train tar."""
  images = {}
  with tarfile.open(os.path.join(manual, prepare_imagenet.TRAIN_TAR)) as outer:
    for member in outer:
      with tarfile.open(fileobj=outer.extractfile(member)) as inner:
        for image in inner:
          images[image.name] = inner.extractfile(image).read()
  return images


def test_capped_preparation_stores_shorter_sides_and_records_it(tmp_path):
  manual, data_dir = str(tmp_path / 'manual'), str(tmp_path / 'data')
  imagenet_fixtures.write_manual_dir(manual, per_class=2, num_val=4,
                                     cmyk_and_png=True)
  originals = _train_tar_images(manual)
  # Two re-encoding processes, the path a real preparation takes.
  path = prepare_imagenet.prepare(manual, data_dir, allow_subset=True,
                                  max_shorter_side=300, processes=2)
  assert prepare_imagenet.stored_max_shorter_side(path) == 300
  with open(os.path.join(path, prepare_imagenet.METADATA_FILE)) as f:
    record = json.load(f)
  assert record['jpeg_quality'] == prepare_imagenet.JPEG_QUALITY == 95
  config = ml_collections.ConfigDict(dict(
      name='imagenet2012', data_dir=data_dir, image_size=64, augment=True,
      eval_crop_fraction=0.875, num_classes=1000, num_workers=0))
  source = data.get_source(config, 'train')
  assert len(source.records) == 8
  resized = 0
  for index in range(len(source.records)):
    example = source.records[index]
    name = example['file_name'].decode()
    stored = Image.open(io.BytesIO(example['image']))
    original = Image.open(io.BytesIO(originals[name]))
    assert stored.format == 'JPEG' and stored.mode == 'RGB', name
    width, height = original.size
    if min(width, height) <= 300:  # never upscaled
      assert stored.size == original.size, name
      if name not in (imagenet_fixtures.CMYK_NAME, imagenet_fixtures.PNG_NAME):
        assert example['image'] == originals[name]  # not even re-encoded
      continue
    resized += 1
    assert min(stored.size) == 300, name
    assert abs(stored.size[0] / stored.size[1] - width / height) < 0.01, name
    # What cap_shorter_side makes in this process, and the same picture.
    assert example['image'] == prepare_imagenet.cap_shorter_side(
        originals[name], 300), name
    reference = np.asarray(original.convert('RGB').resize(
        stored.size, Image.Resampling.BICUBIC), np.int32)
    assert np.abs(np.asarray(stored, np.int32) - reference).mean() < 2, name
  # Validation: 3 of its 4 images are larger (one is 240 x 320).
  assert resized == 5 and record['images_resized'] == 5 + 3
  # The CMYK JPEG and the PNG became RGB JPEGs of the same picture.
  rgb = np.asarray(Image.open(io.BytesIO(imagenet_fixtures.natural_jpeg(
      999, 240, 320))), np.int32)
  for index in range(len(source.records)):
    example = source.records[index]
    if example['file_name'].decode() in (imagenet_fixtures.CMYK_NAME,
                                         imagenet_fixtures.PNG_NAME):
      stored = np.asarray(Image.open(io.BytesIO(example['image'])), np.int32)
      assert np.abs(stored - rgb).mean() < 3
  # Training reports it, and warns where the crops need larger images.
  assert data.describe_pipeline(config, source) == (
      'ImageNet JPEGs, stored pre-resized to shorter side 300 px, decoded in '
      'the training process')
  config.update(image_size=288, eval_image_size=320)
  assert data.required_shorter_side(config) == {'train': 288, 'eval': 366}
  assert 'pre-resized to shorter side 300 px (WARNING: the crops need a ' \
         'shorter side of eval 366 px, so images are upsampled; prepare ' \
         'with --max_shorter_side=366 or 0 for full size)' in (
             data.describe_pipeline(config, source))
  # The same data_dir with another setting is refused, before any work.
  with pytest.raises(ValueError, match='already holds imagenet2012 '
                     'pre-resized to shorter side 300 px, not '
                     '--max_shorter_side=0'):
    prepare_imagenet.prepare(manual, data_dir, allow_subset=True)


def test_bad_max_shorter_side_is_one_line_before_any_work(tmp_path):
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match='--max_shorter_side must be an '
                       r'integer >= 0 \(px; 0 = keep the original images\)'):
      prepare_imagenet.prepare(str(tmp_path / 'missing'), str(tmp_path),
                               max_shorter_side=bad)
  result = helpers.run(['-m', 'nfnets.prepare_imagenet',
                        f'--manual_dir={tmp_path}', f'--data_dir={tmp_path}',
                        '--max_shorter_side=-320'], check=False, timeout=300)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines() == [
      'prepare_imagenet.py: error: --max_shorter_side must be an integer >= 0 '
      '(px; 0 = keep the original images), got -320.']
