"""The benchmarks refuse bad input with one line before compiling."""

import os
import subprocess
import sys

import pytest

_BENCHMARKS = os.path.join(os.path.dirname(__file__), '..', 'benchmarks')
# Arguments that make a missed check cheap. gpu.py: a budget too small to run
# any case, so it would skip every case instead of compiling for minutes.
# peers.py: a peer Python that does not exist, only reached if every check
# passed.
# train_step.py, conv_shapes.py: the smallest net, no timed repetitions.
_SAFE_ARGS = {'gpu.py': ['--budget_s=0.001', '--matmul_size=0'],
              'peers.py': ['--peer_python=/nonexistent'],
              'train_step.py': ['--configs=quickstart', '--steps=1'],
              'conv_shapes.py': ['--config=quickstart', '--reps=1']}


@pytest.mark.parametrize('script, args, devices, message', [
    ('gpu.py', ['--configs=nf_resnet50,nope'], 1, "Unknown config 'nope'"),
    ('gpu.py', ['--batch=7'], 2,
     '--batch=7 is not divisible by the 2 devices'),
    ('gpu.py', ['--image_size=16'], 1,
     '--image_size=16: images must be at least 32 px'),
    ('gpu.py', ['--loops=jpeg:float16'], 1, "--loops: bad 'jpeg:float16'"),
    ('peers.py', ['--config=nope'], 1, "Unknown config 'nope'"),
    ('peers.py', ['--warmup_steps=-1'], 1,
     '--warmup_steps must be >= 0, got -1'),
    ('peers.py', ['--batch=7'], 2,
     '--batch 7 is not divisible by the 2 devices'),
    ('train_step.py', ['--configs=quickstart,nope'], 1,
     "Unknown config 'nope'"),
    ('train_step.py', ['--batch=7'], 2,
     'batch_size=7 is not divisible by the 2 devices'),
    ('train_step.py', ['--image_size=16'], 1,
     'images must be at least 32 px'),
    ('conv_shapes.py', ['--config=nope'], 1, "Unknown config 'nope'"),
    ('conv_shapes.py', ['--batch=7', '--step_rounds=1'], 2,
     'batch_size=7 is not divisible by the 2 devices'),
    ('conv_shapes.py', ['--image_size=16'], 1,
     'images must be at least 32 px'),
])
def test_bad_input_is_refused_in_one_line(script, args, devices, message):
  env = dict(os.environ,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  result = subprocess.run(
      [sys.executable, os.path.join(_BENCHMARKS, script), *_SAFE_ARGS[script],
       *args],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert result.returncode == 2, result.stdout + result.stderr
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert message in result.stderr
  assert result.stdout == ''
