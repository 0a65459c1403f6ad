"""experiment.py (the train and eval loop), train.py and eval.py on CPU, with
real processes and devices: data parallelism over devices and processes,
the loss going down, resume after SIGKILL, divergence, bad workdirs and
datasets, bfloat16, a scanned network's training step and checkpoints, and
what a run logs (console lines, signal statistics)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import experiment
import helpers
from configs import quickstart
from nfnets import checkpointing
from nfnets import data
from nfnets import errors
from nfnets import metric_writer
from nfnets import resnet
from nfnets import spp
from nfnets import stacking
from helpers import TINY
from helpers import run as _run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config(**train):
  config = quickstart.get_config()
  config.train.update({**dict(steps=24, batch_size=32, eval_batch_size=200,
                              checkpoint_every_steps=6, log_every_steps=6,
                              eval_every_steps=12), **train})
  config.model.update(dict(dropout_rate=0.2, stochastic_depth_rate=0.2))
  config.optim.ema_decay = 0.9
  return config


def _final_params(workdir, config):
  exp = experiment.Experiment(config)
  checkpointer = checkpointing.Checkpointer(workdir)
  state, data_state, _ = checkpointer.restore(checkpointer.latest_step(),
                                              exp.abstract_state())
  checkpointer.close()
  return checkpointing.to_host(state), data_state


MULTI_DEVICE_SCRIPT = textwrap.dedent(r'''
  import json, math, re, sys
  import jax, numpy as np
  sys.path.insert(0, '.')
  import experiment
  from configs import quickstart
  from nfnets import data
  assert jax.device_count() == 8, jax.devices()

  def largest_all_reduce(exp, state, batch):
    """Elements in the largest all-reduce of the compiled train step."""
    with jax.set_mesh(exp.mesh):
      text = exp._train_step.lower(state, exp.shard_batch(batch)).compile(
          ).as_text()
    sizes = [0]
    for line in text.splitlines():
      found = re.search(r'=(.*) all-reduce(-start)?\(', line)
      for dims in re.findall(r'\[([\d,]*)\]', found[1] if found else ''):
        sizes.append(math.prod(int(d) for d in dims.split(',') if d))
    return max(sizes)

  result = {}
  final = {}
  for name, model, mixed in (('nf_resnet', 'nf_resnet', False),
                             ('bn_resnet', 'bn_resnet', False),
                             ('nf_mixup_cutmix', 'nf_resnet', True)):
    config = quickstart.get_config()
    config.model.name = model
    if mixed:  # MixUp + CutMix over the global batch
      config.train.mixup_alpha = 0.2
      config.train.cutmix = True
    config.train.batch_size = 32
    config.train.steps = 10
    config.optim.warmup_epochs = 0.0  # full learning rate: params move
    source = data.get_source(config.data, 'train')
    batches = [{'images': source.records.images[i * 32:(i + 1) * 32],
                'labels': source.records.labels[i * 32:(i + 1) * 32]}
               for i in range(2)]
    params = []
    for devices in (jax.devices(), jax.devices()[:1]):
      exp = experiment.Experiment(config, devices=devices)
      state = exp.init_state()
      if name == 'nf_resnet':
        result[f'all_reduce_{len(devices)}'] = largest_all_reduce(
            exp, state, batches[0])
      for batch in batches:
        state, metrics = exp.train_step(state, batch)
      params.append(jax.tree.map(np.asarray, state['params']))
    worst = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
                for a, b in zip(jax.tree.leaves(params[0]),
                                jax.tree.leaves(params[1])))
    result[name] = worst
    final[name] = params[1]
  result['mixing_moves_params'] = max(
      float(np.max(np.abs(a - b))) for a, b in zip(
          jax.tree.leaves(final['nf_resnet']),
          jax.tree.leaves(final['nf_mixup_cutmix'])))
  # The compiled 8-device step with MixUp + CutMix in bfloat16: every
  # collective's result type.
  config = quickstart.get_config()
  config.compute_dtype = 'bfloat16'
  config.train.update(dict(mixup_alpha=0.2, cutmix=True, batch_size=32))
  exp = experiment.Experiment(config)
  state = exp.init_state()
  batch = dict(images=np.zeros((32, 32, 32, 3), np.uint8),
               labels=np.zeros((32,), np.int32)) | exp.mix_parameters(0, 32)
  with jax.set_mesh(exp.mesh):
    lowered = exp._train_step.lower(state, exp.shard_batch(batch))
  # The element type of every all-reduce as the program leaves JAX (what
  # XLA:GPU gets; XLA:CPU's compiler would convert bfloat16 ones itself).
  result['all_reduce_types'] = re.findall(
      r'"stablehlo.all_reduce".*\n\s*\^bb0\(%\w+: tensor<(\w+)>',
      lowered.as_text())
  text = lowered.compile().as_text()
  collectives = {}
  for line in text.splitlines():
    found = re.search(r'= (.*?) (all-gather|all-to-all|collective-permute|'
                      r'all-reduce)(-start)?\(', line)
    if found:
      collectives.setdefault(found[2], []).append(found[1])
  result['collectives'] = collectives
  try:
    config.train.batch_size = 12
    experiment.Experiment(config)
    result['bad_batch'] = 'accepted'
  except ValueError as e:
    result['bad_batch'] = str(e)
  print('RESULT' + json.dumps(result))
''')


def test_eight_devices_equal_one_device():
  # Without the YNN flag (XLA_FLAGS below replaces the one configure_process
  # put in this process's environment): XLA's Eigen convolutions sum
  # weight gradients in an order that depends on the per-device batch (4 vs
  # 32), and two full-rate steps of the BN net amplify that to 2e-4 in the
  # weights and 8% in near-zero BatchNorm offsets. YNNPACK's order does not
  # depend on it (7.7e-6); this test is about the data-parallel semantics.
  # No persistent compilation cache: 8-device CPU programs with collectives
  # loaded back from it hang at a rendezvous on a second run (jaxlib
  # 0.10.2: "only 7 of them arrived"; cold runs pass).
  result = _run(['-c', MULTI_DEVICE_SCRIPT],
                env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
                     'NFNETS_CPU_CONV_FLAG': '0',
                     'JAX_ENABLE_COMPILATION_CACHE': 'false'})
  line = [l for l in result.stdout.splitlines() if l.startswith('RESULT')][0]
  values = json.loads(line[len('RESULT'):])
  # Two SGD steps at full learning rate, BatchNorm statistics synchronized
  # across the 8 devices; float32 sums in another order differ by ~1e-5.
  assert values['nf_resnet'] < 3e-5, values
  assert values['bn_resnet'] < 3e-5, values
  # Mixing pairs examples within each device's shard, so it differs with
  # the device count (by design); it must still change the training.
  assert values['mixing_moves_params'] > 1e-3, values
  # The NF net's gradients are summed over 8 devices; on one there is
  # nothing to sum and only scalars (loss, metrics) pass through an
  # all-reduce.
  assert values['all_reduce_8'] > 10_000, values
  assert values['all_reduce_1'] <= 1, values
  assert 'not divisible by the 8 devices' in values['bad_batch']
  # Mixing moves no image between devices: no gather, all-to-all or permute
  # of anything image-sized (a device's shard: 4 x 32 x 32 x 3 values).
  collectives = values['collectives']
  moved = [shape for kind in ('all-gather', 'all-to-all', 'collective-permute')
           for shape in collectives.get(kind, [])]
  sizes = [math.prod(int(d) for d in dims.split(',') if d)
           for shape in moved for dims in re.findall(r'\[([\d,]*)\]', shape)]
  assert max(sizes, default=0) < 4 * 32 * 32 * 3, moved
  # bfloat16 compute, float32 gradients: every all-reduce sums float32
  # (one per parameter array, plus the loss and metrics).
  types = values['all_reduce_types']
  assert len(types) > 20 and set(types) == {'f32'}, types


def test_loss_goes_down_on_real_digits():
  config = quickstart.get_config()
  config.train.steps = 100
  config.model.width = 0.125
  config.data.random_shift_px = 0
  config.optim.base_learning_rate = 0.4  # peak 0.1
  config.optim.warmup_epochs = 0.1  # 6 of the 100 steps
  exp = experiment.Experiment(config)
  state = exp.init_state()
  iterator = data.train_iterator(config.data, config.train.batch_size, 0,
                                 exp.train_source)
  losses = []
  for _ in range(100):
    state, metrics = exp.train_step(state, next(iterator))
    losses.append(float(metrics['loss']))
  assert np.mean(losses[:10]) == pytest.approx(np.log(10), rel=0.05)
  assert np.mean(losses[-10:]) < 0.4 * np.mean(losses[:10]), losses


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """The final parameters and data state of an uninterrupted TINY run."""
  workdir = str(tmp_path_factory.mktemp('straight') / 'run')
  _run(['train.py', '--config=configs/quickstart.py', *TINY,
        f'--workdir={workdir}'])
  return _final_params(workdir, _tiny_config())


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_writes_checkpoint_then_resume_equals_uninterrupted(
    tmp_path, straight_run, signum):
  args = ['train.py', '--config=configs/quickstart.py', *TINY]
  workdir = str(tmp_path / 'run')
  process = subprocess.Popen([sys.executable, *args, f'--workdir={workdir}'],
                             cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 300
  while time.time() < deadline and not (
      os.path.isdir(checkpoint_dir) and '6' in os.listdir(checkpoint_dir)):
    time.sleep(0.02)
  # Paused, the signal waits for the continue: it lands mid-training.
  process.send_signal(signal.SIGSTOP)
  process.send_signal(signum)
  process.send_signal(signal.SIGCONT)
  stdout, stderr = process.communicate(timeout=300)
  name = signal.Signals(signum).name
  assert process.returncode == 128 + signum, stderr
  assert f'{name} received' in stdout
  match = re.search(rf'Stopped by {name} at step (\d+); checkpoint written; '
                    r'rerun the same command to resume\.', stderr)
  assert match and 'Traceback' not in stderr, stderr
  stopped_at = int(match.group(1))
  assert 6 <= stopped_at < 24
  assert checkpointing.Checkpointer(workdir).latest_step() == stopped_at
  resumed = _run([*args, f'--workdir={workdir}'])
  assert f'resuming from step {stopped_at}' in resumed.stdout
  (want, want_data), (got, got_data) = straight_run, _final_params(
      workdir, _tiny_config())
  assert got_data == want_data and int(got['step']) == 24
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  # The first train row after the resume says how many steps it averages.
  rows = {m['step']: m for m in metric_writer.read_metrics(workdir)
          if m['kind'] == 'train'}
  first_after = min(step for step in rows if step > stopped_at)
  assert rows[first_after]['steps'] == first_after - stopped_at


def test_second_signal_exits_at_once(tmp_path):
  process = subprocess.Popen(
      [sys.executable, 'train.py', '--config=configs/quickstart.py', *TINY,
       '--config.train.steps=2000', f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in process.stdout:  # the stop handlers are in place by now
    if line.startswith('Training'):
      break
  # Both land while paused; Python handles SIGINT (2) first.
  process.send_signal(signal.SIGSTOP)
  process.send_signal(signal.SIGINT)
  process.send_signal(signal.SIGTERM)
  process.send_signal(signal.SIGCONT)
  stdout, stderr = process.communicate(timeout=300)
  assert 'SIGINT received' in stdout
  assert process.returncode == 128 + signal.SIGTERM, stderr
  assert 'Second signal (SIGTERM): exiting now without a checkpoint' in (
      stderr) and 'Traceback' not in stderr, stderr


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
  config = _tiny_config()
  args = ['train.py', '--config=configs/quickstart.py', *TINY]
  straight = str(tmp_path / 'straight')
  _run([*args, f'--workdir={straight}'])

  killed = str(tmp_path / 'killed')
  process = subprocess.Popen([sys.executable, *args, f'--workdir={killed}'],
                             cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  checkpoint_dir = os.path.join(killed, 'checkpoints')
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [d for d in os.listdir(checkpoint_dir) if d.isdigit()] if (
        os.path.isdir(checkpoint_dir)) else []
    if any(int(s) >= 6 for s in steps):
      break
    time.sleep(0.05)
  # One writer per workdir: a second run is refused, naming the holder
  # (paused meanwhile, still holding its lock, so that it cannot finish
  # all 24 steps before the kill below).
  process.send_signal(signal.SIGSTOP)
  second = _run([*args, f'--workdir={killed}'], check=False)
  process.send_signal(signal.SIGCONT)
  assert second.returncode == 2, second.stderr
  assert f'PID {process.pid}' in second.stderr and 'Traceback' not in (
      second.stderr), second.stderr
  while time.time() < deadline:
    steps = [d for d in os.listdir(checkpoint_dir) if d.isdigit()]
    if any(int(s) >= 12 for s in steps):
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  interrupted_at = checkpointing.Checkpointer(killed).latest_step()
  assert interrupted_at is not None and 12 <= interrupted_at < 24
  resumed = _run([*args, f'--workdir={killed}'])
  # The lock the killed run left is taken over.
  assert f'resuming from step {interrupted_at}' in resumed.stdout
  assert 'Taking over' in resumed.stdout and f'PID {process.pid}' in (
      resumed.stdout)
  # One metrics row per (kind, step) although steps after the checkpoint
  # were logged twice.
  rows = [(m['kind'], m['step']) for m in metric_writer.read_metrics(killed)]
  assert len(rows) == len(set(rows)) and ('train', 24) in rows
  assert rows.count(('eval', 24)) == 1

  (straight_state, straight_data), (killed_state, killed_data) = (
      _final_params(straight, config), _final_params(killed, config))
  assert straight_data == killed_data
  assert int(killed_state['step']) == 24
  for a, b in zip(jax.tree.leaves(straight_state), jax.tree.leaves(killed_state)):
    np.testing.assert_array_equal(a, b)

  # eval.py on the final checkpoint reproduces what training logged there.
  logged = [m for m in metric_writer.read_metrics(straight)
            if m['kind'] == 'eval' and m['step'] == 24][0]
  evaluated_stdout = _run(['eval.py', '--config=configs/quickstart.py',
                           *TINY, f'--workdir={straight}']).stdout
  with open(os.path.join(straight, 'eval_test_24.json')) as f:
    evaluated = json.load(f)
  for key in ('loss', 'top1', 'top5', 'ema_loss', 'ema_top1'):
    assert evaluated[key] == pytest.approx(logged[key], rel=1e-5), key
  assert evaluated['examples'] == 1000
  assert 'examples=1000 ' in evaluated_stdout

  # A checkpoint of another architecture is refused with what differs.
  mismatch = _run(['eval.py', '--config=configs/quickstart.py', *TINY,
                   '--config.model.width=0.5', f'--workdir={straight}'],
                  check=False)
  assert mismatch.returncode != 0
  assert 'does not fit the configured model' in mismatch.stderr
  assert 'different shapes' in mismatch.stderr
  assert 'trained with model.width=0.25 (this config: 0.5)' in (
      mismatch.stderr), mismatch.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'nan')
  result = _run(['train.py', '--config=configs/quickstart.py', *TINY,
                 '--config.train.checkpoint_every_steps=1',
                 '--config.optim.base_learning_rate=1e30',
                 f'--workdir={workdir}'], check=False)
  assert result.returncode == 3
  stopped_at = int(re.search(
      r'Training stopped: The loss became NaN or Inf at step (\d+)',
      result.stderr).group(1))
  assert stopped_at < 24 and 'Traceback' not in result.stderr
  assert checkpointing.Checkpointer(workdir).latest_step() == stopped_at - 1


def test_nan_between_log_steps_is_named_and_never_saved(tmp_path):
  """The loss is only fetched at log steps: a NaN at step 2 is found at the
  first log step (6), named as step 2, and nothing is checkpointed."""
  config = _tiny_config(checkpoint_every_steps=12, log_every_steps=6)
  config.optim.base_learning_rate = 1e30
  workdir = str(tmp_path / 'nan')
  lines = []
  with pytest.raises(experiment.TrainingDiverged,
                     match=r'at step (\d+); stopping. No checkpoint') as info:
    experiment.train_and_evaluate(config, workdir, log=lines.append)
  assert int(re.search(r'at step (\d+)', str(info.value)).group(1)) < 6
  assert checkpointing.Checkpointer(workdir).latest_step() is None


def test_unwritable_workdir_and_unknown_dataset(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with pytest.raises(ValueError, match='Cannot create workdir'):
    experiment.train_and_evaluate(_tiny_config(), str(blocker / 'run'))
  config = _tiny_config()
  config.data.name = 'svhn'
  with pytest.raises(ValueError, match="Unknown dataset 'svhn'"):
    experiment.Experiment(config)
  config = _tiny_config()
  config.data.name = 'imagenet2012'
  config.data.data_dir = str(tmp_path / 'no_data')
  config.model.num_classes = config.data.num_classes = 1000
  with pytest.raises(errors.UserError, match='imagenet2012.*not prepared'):
    experiment.Experiment(config)


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_with_same_devices(tmp_path):
  """jax.distributed on localhost (gloo collectives): 2 x 4 CPU devices take
  the same two steps as 1 x 8 devices."""
  worker = os.path.join('tests', 'multiprocess_worker.py')
  single = str(tmp_path / 'single.npz')
  _run([worker, '0', '1', '0', single],
       env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  two = str(tmp_path / 'two.npz')
  port = str(_free_port())
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  processes = [subprocess.Popen([sys.executable, worker, str(i), '2', port, two],
                                cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  assert all(p.returncode == 0 for p in processes), outputs[0][-3000:]
  assert all('8 devices, 4 local' in out for out in outputs)
  with np.load(single) as a, np.load(two) as b:
    assert int(a['devices']) == int(b['devices']) == 8
    assert set(a.files) == set(b.files)
    for key in a.files:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_state():
  config = quickstart.get_config()
  config.compute_dtype = 'bfloat16'
  config.train.steps = 10
  config.optim.ema_decay = 0.99
  exp = experiment.Experiment(config)
  state = exp.init_state()
  iterator = data.train_iterator(config.data, config.train.batch_size, 0,
                                 exp.train_source)
  for _ in range(3):
    state, metrics = exp.train_step(state, next(iterator))
  floats = [x for x in jax.tree.leaves({k: state[k] for k in (
      'params', 'opt_state', 'ema_params', 'bn_state')})
            if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
  assert floats and all(x.dtype == jax.numpy.float32 for x in floats)
  assert metrics['loss'].dtype == jax.numpy.float32
  assert np.isfinite(float(metrics['loss']))


def test_scanned_training_equals_unrolled_and_checkpoints_load_either_way(
    tmp_path):
  """Stored stacked (block_loop 'scan'), the whole step - AGC with per-layer
  unit-wise norms, weight decay off stacked gains and biases, momentum, EMA
  - does what the unrolled network's does; and a checkpoint written in one
  form restores in the other."""
  configs = {}
  for loop in ('unrolled', 'scan'):
    config = _tiny_config(steps=2)
    config.model.update(dict(depths=(1, 3, 1, 1), block_loop=loop,
                             stochastic_depth_rate=0.0, dropout_rate=0.0))
    config.optim.update(dict(agc_clipping=0.01, warmup_epochs=0.0))
    configs[loop] = config
  exps = {loop: experiment.Experiment(c) for loop, c in configs.items()}
  to_scan, to_unrolled = [
      lambda tree, scanned=scanned: stacking.convert_layout(
          tree, resnet.block_plan(configs['scan'].model), scanned)
      for scanned in (True, False)]
  source = data.get_source(configs['scan'].data, 'train')
  batch = {'images': source.records.images[:32],
           'labels': source.records.labels[:32]}
  states = {'unrolled': exps['unrolled'].init_state()}
  # Copies: the step donates its state, and unscanned modules are shared.
  states['scan'] = to_scan(jax.tree.map(jax.numpy.copy, states['unrolled']))
  assert any('stacked_' in m for m in states['scan']['params'])
  for loop, exp in exps.items():
    for _ in range(2):
      states[loop], _ = exp.train_step(states[loop], batch)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(states['unrolled']['params']),
      jax.tree.leaves(to_unrolled(exps['unrolled'].init_state())['params'])))
  assert moved > 1e-3
  for scanned, unrolled in zip(
      jax.tree.leaves(to_unrolled(checkpointing.to_host(states['scan']))),
      jax.tree.leaves(checkpointing.to_host(states['unrolled']))):
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-4,
                               atol=1e-5 * np.max(np.abs(unrolled)))
  for writer, reader in (('unrolled', 'scan'), ('scan', 'unrolled')):
    workdir = str(tmp_path / writer)
    checkpointer = checkpointing.Checkpointer(workdir)
    checkpointer.save(2, states[writer], {})
    restored = checkpointer.restore(2, exps[reader].abstract_state(),
                                    exps[reader].other_layouts())[0]
    checkpointer.close()
    expected = states[writer] if writer == reader else (
        to_scan if reader == 'scan' else to_unrolled)(states[writer])
    jax.tree.map(np.testing.assert_array_equal,
                 checkpointing.to_host(restored),
                 checkpointing.to_host(expected))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir with checkpoints 6, 12, 18, the experiment that made it and
  its console lines (helpers.trained_run: trained once per session)."""
  return helpers.trained_run(tmp_path_factory)


def test_console_has_start_progress_and_end_lines(trained):
  _, _, lines = trained
  assert lines[0].startswith('JAX ') and 'backend cpu' in lines[0]
  assert lines[1].startswith('Training nf_resnet (') and '18 steps' in lines[1]
  assert 'mnist arrays in memory' in lines[1], lines[1]
  progress = [l for l in lines if l.startswith('step ')]
  assert [l.split()[1] for l in progress] == ['6/18', '12/18', '18/18']
  assert all('img/s' in l and 'data wait' in l and 'ETA' in l
             for l in progress)
  assert lines[-1].startswith('Done: 18 steps') and 'top1=' in lines[-1]


def test_signal_statistics_are_logged_during_training(trained):
  workdir, exp, _ = trained
  rows = [r for r in metric_writer.read_metrics(workdir)
          if r['kind'] == 'signal']
  assert [r['step'] for r in rows] == [0, 6, 12, 18]
  for row in rows:
    assert {f'stage{s}/{name}' for s in range(1, 5) for name in (
        'squared_mean', 'variance', 'residual_variance')} <= set(row)
  # Step 0 is the initial parameters' signal propagation, measured anew.
  expected = spp.stage_statistics(exp.signal_statistics(exp.init_state()),
                                  exp.block_plan)
  for name, value in expected.items():
    assert rows[0][name] == pytest.approx(value, rel=1e-5), name
  # Training changes what the network does to its input.
  assert rows[-1]['stage4/variance'] != pytest.approx(
      rows[0]['stage4/variance'], rel=1e-4)
