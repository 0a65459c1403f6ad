"""benchmarks/gpu.py and peers.py refuse bad input with one line before
compiling."""

import os
import subprocess
import sys

import pytest

_GPU = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'gpu.py')
_PEERS = os.path.join(os.path.dirname(__file__), '..', 'benchmarks',
                      'peers.py')


@pytest.mark.parametrize('args, devices, message', [
    (['--configs=nf_resnet50,nope'], 1, "Unknown config 'nope'"),
    (['--batch=7'], 2, '--batch=7 is not divisible by the 2 devices'),
    (['--image_size=16'], 1, '--image_size=16: images must be at least 32 px'),
    (['--loops=jpeg:float16'], 1, "--loops: bad 'jpeg:float16'"),
])
def test_bad_input_is_refused_in_one_line(args, devices, message):
  env = dict(os.environ,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  # A budget too small to run any case: a check that failed to fire would
  # skip every case instead of compiling for minutes.
  result = subprocess.run(
      [sys.executable, _GPU, '--budget_s=0.001', '--matmul_size=0', *args],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert result.returncode == 2, result.stdout + result.stderr
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert message in result.stderr
  assert result.stdout == ''


@pytest.mark.parametrize('args, devices, message', [
    (['--config=nope'], 1, "Unknown config 'nope'"),
    (['--warmup_steps=-1'], 1, '--warmup_steps must be >= 0, got -1'),
    (['--batch=7'], 2, '--batch 7 is not divisible by the 2 devices'),
])
def test_peers_refuses_bad_input_in_one_line(args, devices, message):
  env = dict(os.environ,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  # A peer Python that does not exist: only reached if every check passed.
  result = subprocess.run(
      [sys.executable, _PEERS, '--peer_python=/nonexistent', *args],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert result.returncode == 2, result.stdout + result.stderr
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert message in result.stderr
