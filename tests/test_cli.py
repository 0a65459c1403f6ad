"""The scripts' command line (nfnets.cli, through train.py and eval.py):
config overrides reach the model, and user mistakes are reported in one or
two lines without a traceback."""

import json
import os
import subprocess
import sys

from nfnets import errors
from helpers import TINY
from helpers import run as _run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_override_reaches_model_and_bad_override_fails(tmp_path):
  workdir = str(tmp_path / 'run')
  _run(['train.py', '--config=configs/quickstart.py', *TINY,
        '--config.train.steps=1', '--config.model.alpha=0.5',
        f'--workdir={workdir}'])
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['alpha'] == 0.5
  bad = _run(['train.py', '--config=configs/quickstart.py',
              '--config.model.alphaa=0.5', f'--workdir={workdir}'],
             check=False)
  assert bad.returncode != 0 and 'alphaa' in bad.stderr
  bad = _run(['train.py', '--config=configs/quickstart.py',
              '--config.model.alpha=-1', f'--workdir={workdir}'], check=False)
  assert bad.returncode != 0 and 'alpha must be > 0, got -1' in bad.stderr


# (arguments, extra environment, expected message) for train.py / eval.py.
_QUICK = ['--config=configs/quickstart.py', '--config.train.steps=2']
USER_ERRORS = {
    'unknown_field': (['train.py', *_QUICK, '--config.model.widht=0.5'], {},
                      "unknown config field 'model.widht'"),
    'bad_value_type': (['train.py', *_QUICK, '--config.train.batch_size=abc'],
                       {}, 'invalid literal'),
    'alpha_zero': (['train.py', *_QUICK, '--config.model.alpha=0'], {},
                   'alpha must be > 0, got 0'),
    'negative_batch': (['train.py', *_QUICK, '--config.train.batch_size=-4'],
                       {}, 'train.batch_size must be >= 1, got -4'),
    'batch_vs_devices': (
        ['train.py', *_QUICK, '--config.train.batch_size=12'],
        {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
        'train.batch_size=12 is not divisible by the 8 devices'),
    'tiny_images': (['train.py', *_QUICK, '--config.data.image_size=16'], {},
                    'Image size 16 px is too small'),
    'unknown_activation': (['train.py', *_QUICK,
                            '--config.model.activation=relu7'], {}, 'relu7'),
    'unknown_model': (['train.py', *_QUICK, '--config.model.name=vit'], {},
                      "Unknown model 'vit'"),
    'num_classes': (['train.py', *_QUICK, '--config.model.num_classes=5'], {},
                    'model.num_classes=5'),
    'missing_config': (['train.py', '--config=configs/nope.py'], {},
                       "config file 'configs/nope.py' not found"),
    'workdir_is_file': (['train.py', *_QUICK], {}, 'is a file, not a folder'),
    'eval_empty_workdir': (['eval.py', *_QUICK], {}, 'No checkpoints in'),
    'eval_mistyped_workdir': (['eval.py', *_QUICK], {}, 'does not exist'),
}


def test_user_errors_are_one_or_two_lines_without_traceback(tmp_path):
  processes = {}
  for name, (args, env, _) in USER_ERRORS.items():
    workdir = tmp_path / name
    if name == 'workdir_is_file':
      workdir.write_text('')
    elif name == 'eval_empty_workdir':
      workdir.mkdir()
    processes[name] = subprocess.Popen(
        [sys.executable, *args, f'--workdir={workdir}'], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **env})
  for name, process in processes.items():
    stdout, stderr = process.communicate(timeout=600)
    expected = USER_ERRORS[name][2]
    assert process.returncode == errors.USER_ERROR_EXIT_CODE, (name, stderr)
    assert expected in stderr, (name, stderr)
    assert 'Traceback' not in stderr + stdout, (name, stderr)
    assert len(stderr.strip().splitlines()) <= 2, (name, stderr)
  # Refused runs leave no workdir behind; eval creates none.
  for name in ('alpha_zero', 'negative_batch', 'tiny_images',
               'eval_mistyped_workdir'):
    assert not (tmp_path / name).exists(), name


def test_full_disk_at_start_is_one_line_and_leaves_no_temporary_file(
    tmp_path):
  """/dev/full answers every write with ENOSPC: config.json.tmp linked to it
  is a disk that fills exactly when the run records its config."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  os.symlink('/dev/full', workdir / 'config.json.tmp')
  result = _run(['train.py', '--config=configs/quickstart.py', *TINY,
                 f'--workdir={workdir}'], check=False)
  assert result.returncode == errors.USER_ERROR_EXIT_CODE, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'No space left on the disk of' in lines[0] and (
      'config.json; free space and rerun the same command' in lines[0]), lines
  assert not os.path.lexists(workdir / 'config.json.tmp')
  assert not os.path.exists(workdir / 'config.json')
