"""sweep.py: grid parsing and validation (no training), and a real 2 x 2 sweep."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from nfnets import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = 'configs/quickstart.py'


def _points(*specs, seeds=(0,), fixed=()):
  axes = [sweep.parse_axis(s) for s in specs]
  return axes, sweep.make_grid(axes, seeds, fixed)


def test_parse_axis_plain_tuple_and_linked():
  axis = sweep.parse_axis('train.batch_size=4,8,16')
  assert axis.name == 'train.batch_size'
  assert [v.assignments for v in axis.values] == [
      (('train.batch_size', '4'),), (('train.batch_size', '8'),),
      (('train.batch_size', '16'),)]
  # Commas inside brackets do not split values.
  axis = sweep.parse_axis('model.depths=(1,1,1,1),(3,4,6,3)')
  assert [v.label for v in axis.values] == ['(1,1,1,1)', '(3,4,6,3)']
  # Linked points with labels and an axis name.
  axis = sweep.parse_axis('method::NF:model.name=nf_resnet|'
                          'He:model.name=nf_resnet,model.use_scaled_ws=false')
  assert axis.name == 'method'
  assert [v.label for v in axis.values] == ['NF', 'He']
  assert axis.values[1].assignments == (('model.name', 'nf_resnet'),
                                        ('model.use_scaled_ws', 'false'))
  # One linked point without '|', default label and axis name.
  axis = sweep.parse_axis('model.name=nf_resnet,model.use_scaled_ws=false')
  assert axis.name == 'model.name+model.use_scaled_ws'
  assert [v.label for v in axis.values] == [
      'model.name=nf_resnet,model.use_scaled_ws=false']


@pytest.mark.parametrize('spec, message', [
    ('', 'Empty --sweep'),
    ('model.alpha=', 'is not FIELD=VALUE'),
    ('model.alpha=0.1,,0.2', 'empty value'),
    ('model.alpha=0.1,0.1', 'repeated value'),
    ('seed=1,2', '--seeds'),
    ('model alpha=1', 'not a config field name'),
    ('model.name=a,model.name=b|model.name=c', 'sets a field twice'),
])
def test_parse_axis_refuses_bad_specs(spec, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_axis(spec)


def test_grid_order_folders_and_conflicts():
  axes, points = _points('model.alpha=0.1,0.2', 'train.batch_size=4,8',
                         seeds=(0, 1), fixed=[('train.steps', '3')])
  assert len(points) == 8
  assert points[0].args() == ['--config.train.steps=3', '--config.model.alpha=0.1',
                              '--config.train.batch_size=4', '--config.seed=0']
  assert [p.seed for p in points[:2]] == [0, 1]  # seeds vary fastest
  assert len({p.name for p in points}) == 8
  assert points[0].name == 'model.alpha=0.1__train.batch_size=4__seed=0'
  with pytest.raises(ValueError, match='model.alpha is set by two sweeps'):
    _points('model.alpha=0.1', 'x::model.alpha=0.2,model.width=1')
  with pytest.raises(ValueError, match='fixed .* and swept'):
    _points('model.alpha=0.1', fixed=[('model.alpha', '0.3')])
  with pytest.raises(ValueError, match='No seeds'):
    _points('model.alpha=0.1', seeds=())
  with pytest.raises(ValueError, match='repeated seed'):
    sweep.parse_seeds('0,0')


@pytest.mark.parametrize('spec, message', [
    ('model.alphaa=0.1', "Unknown config field 'model.alphaa': model has no "
                         "'alphaa'"),
    ('modl.alpha=0.1', "the config has no 'modl'"),
    ('model.alpha=abc', 'model.alpha=abc: could not convert'),
    ('train.batch_size=4.5', 'train.batch_size=4.5'),
    ('model.use_scaled_ws=maybe', 'use_scaled_ws=maybe'),
    ('model.alpha=0.2,0', 'model.alpha=0 .*alpha must be > 0, got 0'),
    ('model.depths=(1,1,1)', 'depths must be 4 positive integers'),
])
def test_validate_grid_names_the_bad_field(spec, message):
  _, points = _points(spec)
  with pytest.raises(ValueError, match=message):
    sweep.validate_grid(QUICKSTART, points)


def test_validate_grid_applies_overrides_per_point():
  _, points = _points('model::NF:model.name=nf_resnet|'
                      'BN:model.name=bn_resnet,model.bn_order=relu_bn_conv',
                      'model.depths=(1,1,1,1),(2,1,1,1)', seeds=(3,))
  configs = sweep.validate_grid(QUICKSTART, points)
  assert [(c.model.name, c.model.bn_order, c.model.depths, c.seed)
          for c in configs] == [
              ('nf_resnet', 'bn_relu_conv', (1, 1, 1, 1), 3),
              ('nf_resnet', 'bn_relu_conv', (2, 1, 1, 1), 3),
              ('bn_resnet', 'relu_bn_conv', (1, 1, 1, 1), 3),
              ('bn_resnet', 'relu_bn_conv', (2, 1, 1, 1), 3)]


def test_cli_refuses_before_running(tmp_path):
  workdir = tmp_path / 'never'
  for args, message in [
      ([], 'No --sweep'),
      (['--sweep=model.alphaa=1'], "model has no 'alphaa'"),
      (['--sweep=model.alpha=1', '--plot_x=model.width'], 'not a swept axis')]:
    result = subprocess.run(
        [sys.executable, 'sweep.py', f'--config={QUICKSTART}',
         f'--workdir={workdir}', *args], cwd=ROOT, text=True,
        capture_output=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
  assert not workdir.exists()


@pytest.mark.parametrize('code, stderr, status, step', [
    (0, '', 'finished', None),
    (3, 'train.py: Training stopped: The loss became NaN or Inf at step 7; x',
     'diverged', 7),
    (1, 'Training stopped: Loss is nan at step 5; stopping.', 'diverged', 5),
    (2, 'noise\ntrain.py: workdir /x is locked by process 12', 'failed', None),
    (1, 'Traceback ...\nRuntimeError: boom', 'crashed', None),
    (-9, '', 'crashed', None),
    (143, 'train.py: Stopped by SIGTERM at step 1,200; checkpoint written; '
     'rerun the same command to resume.', 'stopped', None),
    (130, 'Traceback ...\nKeyboardInterrupt', 'crashed', None),
])
def test_classify_exit_codes(code, stderr, status, step):
  outcome = sweep.classify(code, stderr)
  assert (outcome.status, outcome.diverged_step) == (status, step)
  if status == 'failed':
    assert outcome.reason.endswith('locked by process 12')
  if code == 1 and status == 'crashed':
    assert 'RuntimeError: boom' in outcome.reason
  if code == -9:
    assert outcome.reason == 'killed by signal 9'


def test_tables_and_plot_from_rows(tmp_path):
  axes, points = _points('model.name=nf_resnet,bn_resnet',
                         'train.batch_size=4,16,64', seeds=(0, 1))
  rows = []
  for i, point in enumerate(points):
    row = dict(point.labels, seed=point.seed, status='finished', reason='',
               diverged_step=None, wall_s=10.0, top1=0.5 + 0.01 * i,
               loss=1.0)
    if point.name.startswith('model.name=bn_resnet__train.batch_size=4__'):
      row = {k: v for k, v in row.items() if k not in ('top1', 'loss')}
      row.update(status='diverged', diverged_step=3)
    rows.append(row)
  table = sweep.markdown_table(axes, rows, ['top1'])
  # nf_resnet, batch 4: top1 of seeds 0 and 1 are 0.50 and 0.51.
  assert '| nf_resnet | 4 | 2 finished | 50.50 ± 0.71 | 10 |' in table
  assert '| bn_resnet | 4 | 2 diverged | - | 10 |' in table
  pivot = sweep.pivot_table(axes, rows, 'train.batch_size', 'top1')
  assert pivot.splitlines()[0] == ('| model.name | train.batch_size=4 | '
                                   'train.batch_size=16 | train.batch_size=64 |')
  assert '| bn_resnet | - (2/2 diverged) | 58.50 ± 0.71 |' in pivot
  png = str(tmp_path / 'plot.png')
  sweep.plot(png, axes, rows, 'train.batch_size', 'top1')
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match="--metric='top7' is in no finished"):
    sweep.plot(png, axes, rows, 'train.batch_size', 'top7')


def test_final_eval_adds_train_fit_over_the_last_tenth(tmp_path):
  rows = [dict(step=s, kind='train', loss=3.0 - s / 100, top1=s / 100)
          for s in range(10, 101, 10)]
  rows.insert(5, dict(step=50, kind='eval', loss=9.0, top1=0.1))
  rows.append(dict(step=100, kind='eval', loss=1.5, top1=0.6, examples=10))
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows))
  # Only the row of step 100 lies in the last 10% of 100 steps.
  assert sweep.final_eval(str(tmp_path)) == dict(
      loss=1.5, top1=0.6, examples=10, train_end_loss=2.0, train_end_top1=1.0)


def test_rerun_says_resume_for_a_point_with_a_checkpoint(tmp_path,
                                                         monkeypatch):
  """The progress line of a point that has a checkpoint names its step."""
  _, points = _points('model.alpha=0.2,0.5')
  interrupted = tmp_path / points[0].name / 'checkpoints'
  for name in ('400', '1200', '1600.orbax-checkpoint-tmp-1', 'damaged'):
    (interrupted / name).mkdir(parents=True)
  # Each point's process exits at once: only the launch and the log matter.
  monkeypatch.setattr(sweep, 'point_command',
                      lambda *_: [sys.executable, '-c', 'pass'])
  configs = [ml_collections.ConfigDict({'seed': 0}) for _ in points]
  lines = []
  sweep.run_points(QUICKSTART, str(tmp_path), points, configs,
                   log=lines.append, poll_s=0.01)
  starts = [l for l in lines if re.match(r'\[\d/2\] (start|resume) ', l)]
  assert starts == ['[0/2] resume model.alpha=0.2 seed=0 (from step 1,200)',
                    '[1/2] start model.alpha=0.5 seed=0'], lines


def _processes_mentioning(text):
  """Process ids whose command line contains text (Linux /proc)."""
  found = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        if text.encode() in f.read():
          found.append(pid)
    except OSError:
      pass  # exited meanwhile
  return found


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_sweep_runs_resumes_after_kill_skips_and_records_divergence(tmp_path):
  """2 x 2 grid of a few-step quickstart: one axis value diverges."""
  workdir = tmp_path / 'sweep'
  command = [
      sys.executable, 'sweep.py', f'--config={QUICKSTART}',
      f'--workdir={workdir}',
      '--sweep=optim.base_learning_rate=0.2,1e30',
      '--sweep=model.alpha=0.2,0.5',
      '--set=train.steps=12', '--set=train.batch_size=32',
      '--set=train.checkpoint_every_steps=4', '--set=train.log_every_steps=4',
      '--set=train.eval_batch_size=500', '--plot_x=model.alpha']
  first = workdir / 'optim.base_learning_rate=0.2__model.alpha=0.2__seed=0'
  second = workdir / 'optim.base_learning_rate=0.2__model.alpha=0.5__seed=0'

  # Kill the sweep once the second point has written a checkpoint.
  with open(tmp_path / 'killed.log', 'w') as log:
    process = subprocess.Popen(command, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    checkpoints = second / 'checkpoints'
    if checkpoints.is_dir() and any(d.isdigit() for d in os.listdir(checkpoints)):
      break
    time.sleep(0.05)
  assert process.poll() is None, (tmp_path / 'killed.log').read_text()
  process.send_signal(signal.SIGKILL)
  process.wait()
  # Its train.py child dies with it (SIGKILL on parent death).
  deadline = time.time() + 30
  while _processes_mentioning(str(second)) and time.time() < deadline:
    time.sleep(0.05)
  assert not _processes_mentioning(str(second))
  assert json.loads((first / sweep.STATUS_FILE).read_text())['status'] == (
      'finished')
  assert not (second / sweep.STATUS_FILE).exists()
  resumed_at = sweep.checkpoint_step(str(second))
  assert resumed_at is not None

  # The rerun skips the finished point, resumes the killed one (its training
  # died with the sweep, so the workdir is free) and runs the rest.
  rerun = subprocess.run(command, cwd=ROOT, text=True, capture_output=True,
                         timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert '4 points, 1 already done, 3 to run' in rerun.stdout
  assert (f'[1/4] resume optim.base_learning_rate=0.2 model.alpha=0.5 seed=0 '
          f'(from step {resumed_at:,})') in rerun.stdout, rerun.stdout
  assert re.search(r'resum(ing|ed) from (step )?\S*', (second / 'stdout.log')
                   .read_text(), re.IGNORECASE)
  assert '[4/4]' in rerun.stdout and 'ETA' in rerun.stdout

  rows = _read_csv(workdir / 'results.csv')
  assert [(r['optim.base_learning_rate'], r['model.alpha'], r['seed'])
          for r in rows] == [('0.2', '0.2', '0'), ('0.2', '0.5', '0'),
                             ('1e30', '0.2', '0'), ('1e30', '0.5', '0')]
  for row in rows[:2]:
    assert row['status'] == 'finished'
    assert 0 <= float(row['top1']) <= float(row['top5']) <= 1
    assert float(row['loss']) > 0 and float(row['wall_s']) > 0
  for row in rows[2:]:
    assert row['status'] == 'diverged', row
    assert 1 <= int(row['diverged_step']) <= 12
    assert 'Training stopped' in row['reason'] and row['top1'] == ''
  # The killed-and-resumed point logged the same final evaluation as a
  # point is expected to: one eval row, at the last step.
  evals = [json.loads(l) for l in (second / 'metrics.jsonl').read_text()
           .splitlines() if '"eval"' in l]
  assert [e['step'] for e in evals] == [12]
  assert (workdir / 'top1_vs_model.alpha.png').exists()
  assert '| 0.2 | 0.5 | 1 finished |' in (workdir / 'results.md').read_text()

  # Everything is done: a third run trains nothing.
  again = subprocess.run(command, cwd=ROOT, text=True, capture_output=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert '4 points, 4 already done, 0 to run' in again.stdout
  assert _read_csv(workdir / 'results.csv') == rows
