"""predict.py on the workdir of test_folder.py's short training run: the
same probabilities as a direct model call on the eval pipeline's images,
the right classes, text and JSON output, unreadable and missing paths,
mismatched models, and the command itself once as a subprocess."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import predict
import test_folder
from nfnets import data
from nfnets import errors
from nfnets import models
from nfnets import weights as weights_lib


@pytest.fixture(name='run')
def _run(tmp_path_factory):
  """(workdir, config) of the trained tiny folder run."""
  workdir, config, _ = test_folder.trained_run(tmp_path_factory)
  return workdir, config


def _predict(config, paths, workdir=None, weights=None, **options):
  """(results, stdout text, warnings) of predict.run in this process."""
  out, warnings = io.StringIO(), []
  results = predict.run(config, workdir, weights, paths, out=out,
                        warn=warnings.append, **options)
  return results, out.getvalue(), warnings


def _validation_files(config):
  """Every file of the validation split in scan order (the eval order),
  the corrupt one included, and their labels."""
  records = data.get_source(config.data, 'validation').records
  return [records.path(i) for i in range(len(records))], records.labels


def test_probabilities_equal_a_direct_model_call(run):
  workdir, config = run
  paths, labels = _validation_files(config)
  results, text, warnings = _predict(config, paths, workdir=workdir,
                                     top_k=3, batch_size=4)
  assert 'with the EMA parameters of workdir' in warnings[-1]
  # The reference: the EMA parameters on the eval pipeline's batches,
  # normalized with the training Source's mean and std.
  loaded = weights_lib.read(workdir)
  source = data.get_source(config.data, 'train')
  model = models.build(config.model)
  apply = jax.jit(lambda p, s, x: model.apply(p, s, None, x, False)[0])
  expected = []
  for batch in data.eval_batches(config.data, 'validation', 4):
    images = (jnp.asarray(batch['images'], jnp.float32)
              - jnp.asarray(source.mean)) / jnp.asarray(source.std)
    probabilities = jax.nn.softmax(apply(loaded.ema_params, loaded.bn_state,
                                         images))
    expected += [row for row, keep in zip(np.asarray(probabilities),
                                          batch['mask']) if keep]
  classified = [r for r in results if 'top_k' in r]
  assert len(classified) == len(expected) == 9
  correct = 0
  for result, reference, label in zip(
      classified, expected, [l for r, l in zip(results, labels)
                             if 'top_k' in r]):
    got = {entry['class']: entry['probability'] for entry in result['top_k']}
    np.testing.assert_allclose([got[c] for c in range(3)], reference,
                               rtol=1e-5, atol=1e-7)
    assert [e['class'] for e in result['top_k']] == list(
        np.argsort(-reference, kind='stable'))
    assert [e['name'] for e in result['top_k']] == [
        test_folder.CLASSES[e['class']] for e in result['top_k']]
    correct += result['top_k'][0]['class'] == label
  assert correct >= 7, correct  # observed 8-9 of 9 (test_folder)
  # One line per file, the corrupt one saying so; top-1 name first.
  lines = text.splitlines()
  assert len(lines) == 10
  corrupt = os.path.join(test_folder.CORRUPT_VALIDATION)
  for line, path, result in zip(lines, paths, results):
    assert line.startswith(f'{path}: ')
    if path.endswith(corrupt):
      assert line.endswith('error: not a readable JPEG or PNG image '
                           '(skipped)')
      continue
    first = result['top_k'][0]
    assert line.split(': ', 1)[1].startswith(
        f'{first["name"]} {first["probability"]:.3f}, ')


def test_json_output_and_ema_choice(run):
  workdir, config = run
  folder = os.path.join(config.data.data_dir, 'validation', 'one')
  _, text, _ = _predict(config, [folder], workdir=workdir, top_k=2,
                        as_json=True)
  document = json.loads(text)
  assert [os.path.basename(r['path']) for r in document] == [
      '1_0.png', '1_1.JPG', '1_2.jpeg']
  for result in document:
    assert [set(entry) for entry in result['top_k']] == [
        {'class', 'name', 'probability'}] * 2
    assert result['top_k'][0]['probability'] >= result['top_k'][1][
        'probability']
  plain, _, warnings = _predict(config, [folder], workdir=workdir, top_k=2,
                                ema='no')
  assert 'with the parameters of workdir' in warnings[-1]
  assert plain[0]['top_k'] != document[0]['top_k']  # other parameters


def test_non_images_missing_paths_and_bad_options(run, tmp_path):
  workdir, config = run
  image = os.path.join(config.data.data_dir, 'validation', 'seven', '7_0.png')
  text_file = tmp_path / 'readme.txt'
  text_file.write_text('not an image')
  results, _, _ = _predict(config, [str(text_file), image], workdir=workdir)
  assert results[0] == {'path': str(text_file),
                        'error': 'not a readable JPEG or PNG image'}
  assert 'top_k' in results[1]
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'notes.txt').write_text('x')
  (empty / 'data.csv').write_text('x')
  cases = [
      (dict(paths=[str(empty)]), r'No image files \(.jpg, .jpeg, .png\) in'),
      (dict(paths=[str(tmp_path / 'nope.jpg')]), r"nope.jpg' does not exist"),
      (dict(paths=[]), 'Give the images to classify'),
      (dict(paths=[str(text_file)]), 'None of the 1 image'),
      (dict(paths=[image], weights='x.safetensors'), 'exactly one of'),
      (dict(paths=[image], workdir=None), 'exactly one of'),
      (dict(paths=[image], top_k=0), '--top_k=0'),
      (dict(paths=[image], workdir=str(tmp_path / 'none')), 'does not exist'),
  ]
  for options, message in cases:
    options = {'workdir': workdir, **options}
    with pytest.raises(errors.UserError, match=message):
      _predict(config, **options)


def test_a_weights_file_with_and_without_ema(run, tmp_path):
  workdir, config = run
  image = os.path.join(config.data.data_dir, 'validation', 'seven', '7_0.png')
  loaded = weights_lib.read(workdir)
  path = str(tmp_path / 'plain.safetensors')
  weights_lib.save_weights(path, loaded.params, loaded.bn_state,
                           loaded.config_dict)
  from_file, _, warnings = _predict(config, [image], weights=path)
  assert 'with the parameters of weights file' in warnings[-1]
  from_workdir, _, _ = _predict(config, [image], workdir=workdir, ema='no')
  assert from_file == from_workdir
  with pytest.raises(errors.UserError, match='--ema=yes but weights file .* '
                     'has no EMA parameters'):
    _predict(config, [image], weights=path, ema='yes')


def test_a_model_of_another_shape_names_the_field(run):
  workdir, config = run
  image = os.path.join(config.data.data_dir, 'validation', 'seven', '7_0.png')
  wider = test_folder.tiny_config(config.data.data_dir)
  wider.model.width = 0.25
  with pytest.raises(errors.UserError,
                     match=r'checkpoint step 20 was made with model.width '
                     r'0.125 \(this config: 0.25\)'):
    _predict(wider, [image], workdir=workdir)
  more_classes = test_folder.tiny_config(config.data.data_dir)
  more_classes.model.num_classes = 4
  with pytest.raises(errors.UserError,
                     match=r"do not fit the configured model: .*different "
                     r"shapes.*resnet/classifier'\]\['b'\]: \(4,\) vs \(3,\)"):
    _predict(more_classes, [image], workdir=workdir)


def test_predict_py_command(run):
  workdir, config = run
  folder = os.path.join(config.data.data_dir, 'validation')
  result = helpers.run([
      'predict.py', '--config=configs/folder.py',
      f'--config.data.data_dir={config.data.data_dir}',
      '--config.data.num_classes=3', '--config.model.width=0.125',
      '--config.data.image_size=32', '--config.data.augment=False',
      f'--workdir={workdir}', '--top_k=2', folder], check=False)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 10 and 'error: not a readable' in lines[9]
  in_process, _, _ = _predict(config, [folder], workdir=workdir, top_k=2)
  assert lines[:9] == [predict.format_line(r) for r in in_process[:9]]
  failed = helpers.run(['predict.py', '--config=configs/folder.py',
                        f'--workdir={workdir}', '--ema=maybe', folder],
                       check=False)
  assert failed.returncode == 2 and 'ema' in failed.stderr
