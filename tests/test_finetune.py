"""Starting from trained weights: the weights file (nfnets.weights), a run
initialized from another run's checkpoint or weights file with a new
classifier (config.init_from), and gradient accumulation
(train.accumulation_steps)."""

import json
import os

import jax
import numpy as np
import pytest

import experiment
import helpers
from configs import quickstart
from nfnets import errors
from nfnets import weights


def _tiny(**train):
  config = quickstart.get_config()
  config.model.update(dict(width=0.125, dropout_rate=0.0,
                           stochastic_depth_rate=0.0))
  config.train.update({**dict(steps=6, batch_size=32, eval_batch_size=200,
                              log_every_steps=3, checkpoint_every_steps=3,
                              eval_every_steps=0), **train})
  config.optim.warmup_epochs = 0.0
  return config


def _leaves(tree):
  return jax.tree.leaves(jax.tree.map(np.asarray, tree))


def test_accumulated_micro_batches_equal_one_large_batch():
  source_batches = []
  config = _tiny(batch_size=32)
  exp = experiment.Experiment(config)
  images = exp.train_source.records.images[:64]
  labels = exp.train_source.records.labels[:64]
  for start in (0, 32):
    source_batches.append({'images': images[start:start + 32],
                           'labels': labels[start:start + 32]})
  results = []
  for micro_batches in (1, 4):
    exp = experiment.Experiment(_tiny(batch_size=32,
                                      accumulation_steps=micro_batches))
    state = exp.init_state()
    for batch in source_batches:
      state, metrics = exp.train_step(state, batch)
    results.append((_leaves(state['params']), float(metrics['loss'])))
  (one, loss_one), (four, loss_four) = results
  worst = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
              for a, b in zip(one, four))
  # Two SGD steps at full learning rate; only the order of float32 sums
  # differs (4 x 8 examples against 32).
  assert worst < 2e-5, worst
  assert loss_four == pytest.approx(loss_one, rel=1e-5)
  # The parameters did move: the equality is not of two untrained nets.
  fresh = _leaves(experiment.Experiment(_tiny()).init_state()['params'])
  assert max(float(np.max(np.abs(a - b))) for a, b in zip(one, fresh)) > 1e-3


@pytest.mark.parametrize('change,message', [
    (dict(accumulation_steps=0), 'accumulation_steps must be an integer >= 1'),
    (dict(accumulation_steps=3), 'does not split into'),
])
def test_bad_accumulation_is_refused(change, message):
  with pytest.raises(errors.UserError, match=message):
    experiment.validate_config(_tiny(**change), device_count=1)


def test_weights_file_round_trips_and_refuses_to_overwrite(tmp_path,
                                                          tmp_path_factory):
  workdir, exp, _ = helpers.trained_run(tmp_path_factory)
  from_run = weights.read(workdir)
  assert 'checkpoint step 18' in from_run.source
  path = str(tmp_path / 'w.safetensors')
  weights.save_weights(path, from_run.params, from_run.bn_state,
                       from_run.config_dict, from_run.ema_params)
  again = weights.read(path)
  for a, b in zip(_leaves(from_run.params) + _leaves(from_run.ema_params),
                  _leaves(again.params) + _leaves(again.ema_params)):
    np.testing.assert_array_equal(a, b)
  assert again.config_dict == from_run.config_dict
  with pytest.raises(errors.UserError, match='never overwritten'):
    weights.save_weights(path, again.params, {}, {})
  # A pickle, a truncated file, something else: refused by name.
  (tmp_path / 'p.safetensors').write_bytes(b'\x80\x04\x95 pickled')
  with pytest.raises(errors.UserError, match='pickle'):
    weights.read(str(tmp_path / 'p.safetensors'))
  data = open(path, 'rb').read()
  (tmp_path / 't.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(errors.UserError, match='truncated'):
    weights.read(str(tmp_path / 't.safetensors'))
  with pytest.raises(errors.UserError, match='does not exist'):
    weights.read(str(tmp_path / 'nowhere'))


def test_init_from_a_run_with_a_new_classifier(tmp_path, tmp_path_factory):
  source_workdir, _, _ = helpers.trained_run(tmp_path_factory)
  source = weights.read(source_workdir)
  config = helpers.workdir_config(steps=3, signal_stats_every_steps=0)
  config.model.num_classes = config.data.num_classes = 10
  config.init_from.path = source_workdir
  lines = []
  exp = experiment.Experiment(config)
  state = exp.initialize_from(exp.init_state(), lines.append)
  assert 'nothing re-initialized' in lines[0], lines
  for a, b in zip(_leaves(state['params']), _leaves(source.params)):
    np.testing.assert_array_equal(a, b)
  assert int(state['step']) == 0

  # Another number of classes: everything but the classifier is loaded.
  config.model.num_classes = config.data.num_classes = 7
  config.data.name = 'fake'
  lines = []
  exp = experiment.Experiment(config)
  fresh = exp.init_state()
  state = exp.initialize_from(fresh, lines.append)
  assert 're-initialized resnet/classifier' in lines[0], lines
  for module, entries in state['params'].items():
    for name, value in entries.items():
      expected = (fresh['params'] if module == 'resnet/classifier' else
                  source.params)[module][name]
      np.testing.assert_array_equal(np.asarray(value), np.asarray(expected))

  # Training from there: the first loss is that of the loaded network.
  workdir = str(tmp_path / 'finetune')
  log = []
  experiment.train_and_evaluate(config, workdir, log=log.append)
  assert any(line.startswith('Initialized from workdir') for line in log), log
  assert json.load(open(os.path.join(workdir, 'config.json')))[
      'init_from']['path'] == source_workdir


def test_init_from_a_different_network_names_the_mismatch(tmp_path_factory):
  source_workdir, _, _ = helpers.trained_run(tmp_path_factory)
  config = helpers.workdir_config()
  config.model.width = 0.25  # the source run is width 0.125
  config.init_from.path = source_workdir
  exp = experiment.Experiment(config)
  with pytest.raises(errors.UserError,
                     match=r"made with model.width 0.125 \(this config: 0.25\)"):
    exp.initialize_from(exp.init_state(), print)
  config.init_from.update(dict(path=source_workdir + '-missing'))
  with pytest.raises(errors.UserError, match='does not exist'):
    experiment.validate_config(config)


def test_a_run_recorded_before_new_fields_resumes_without_a_change():
  from nfnets import workdir as workdir_lib
  current = workdir_lib.config_to_dict(_tiny())
  recorded = json.loads(json.dumps(current))
  for name in ('matmul_precision', 'deterministic', 'init_from'):
    del recorded[name]
  for name in ('accumulation_steps', 'bn_sync_devices'):
    del recorded['train'][name]
  for name in ('ws_form', 'padding', 'strided_shortcut'):
    del recorded['model'][name]
  assert workdir_lib.differences(recorded, current) == {}
  current['model']['padding'] = 'symmetric'
  assert workdir_lib.differences(recorded, current) == {
      'model.padding': ['same', 'symmetric']}


def test_malformed_weights_files_are_one_line_and_files_are_shareable(
    tmp_path, tmp_path_factory):
  import struct
  header = b'[1, 2, 3]'
  (tmp_path / 'l.safetensors').write_bytes(
      struct.pack('<Q', len(header)) + header)
  with pytest.raises(errors.UserError, match='not a safetensors file'):
    weights.read(str(tmp_path / 'l.safetensors'))
  workdir, _, _ = helpers.trained_run(tmp_path_factory)
  source = weights.read(workdir)
  path = tmp_path / 'w.safetensors'
  weights.save_weights(str(path), source.params, {}, source.config_dict)
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
  (tmp_path / 'file').write_text('x')
  with pytest.raises(errors.UserError, match='Cannot create the folder'):
    weights.save_weights(str(tmp_path / 'file' / 'w.safetensors'),
                         source.params, {}, source.config_dict)


def test_a_refused_run_leaves_an_existing_folder_as_it_was(tmp_path):
  config = _tiny()
  config.init_from.path = str(tmp_path / 'source')
  os.makedirs(config.init_from.path)  # exists, but holds no checkpoints
  workdir = tmp_path / 'mine'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  with pytest.raises(errors.UserError, match='without checkpoints'):
    experiment.train_and_evaluate(config, str(workdir), log=lambda _: None)
  assert sorted(os.listdir(workdir)) == ['notes.txt']
