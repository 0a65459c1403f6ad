"""The benchmarks refuse bad input with one line before compiling; the GPU
benchmark runs every kind of case on a CPU at tiny sizes."""

import json
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Arguments that make a missed check cheap. gpu: a budget too small to run
# any case, so it would skip every case instead of compiling for minutes
# (--allow_cpu: past the CPU refusal to the checks under test).
# peers: a peer Python that does not exist, only reached if every check
# passed.
# train_step, conv_shapes, compile_time, train_loop: the smallest nets, no
# timed repetitions. input_pipeline: a few JPEGs, measured briefly.
_SAFE_ARGS = {'gpu': ['--allow_cpu', '--budget_s=0.001', '--matmul_size=0'],
              'peers': ['--peer_python=/nonexistent'],
              'train_step': ['--configs=quickstart', '--steps=1'],
              'conv_shapes': ['--config=quickstart', '--reps=1'],
              'compile_time': ['--variants=ResNet26', '--steps=1',
                               '--image_size=32', '--batch=2'],
              'train_loop': ['--configs=quickstart'],
              'input_pipeline': ['--images=3', '--workers=0',
                                 '--seconds=0.1']}


def _run(module: str, args, devices: int = 1, timeout: int = 120):
  """python -m benchmarks.<module> args, from the repository root."""
  env = dict(os.environ,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.run(
      [sys.executable, '-m', f'benchmarks.{module}', *args], cwd=ROOT,
      capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _assert_refused_in_one_line(result, message):
  assert result.returncode == 2, result.stdout + result.stderr
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert message in result.stderr
  assert result.stdout == ''


@pytest.mark.parametrize('script, args, devices, message', [
    ('gpu', ['--configs=nf_resnet50,nope'], 1, "Unknown config 'nope'"),
    ('gpu', ['--batch=7'], 2,
     '--batch=7 is not divisible by the 2 devices'),
    ('gpu', ['--image_size=16'], 1,
     '--image_size=16: images must be at least 32 px'),
    ('gpu', ['--loops=jpeg:float16'], 1, "--loops: bad 'jpeg:float16'"),
    ('gpu', ['--eval_dtypes=float16'], 1,
     "--eval_dtypes: unknown 'float16'"),
    ('gpu', ['--matmul_precision=tf32'], 1, "Unknown matmul_precision 'tf32'"),
    ('peers', ['--config=nope'], 1, "Unknown config 'nope'"),
    ('peers', ['--warmup_steps=-1'], 1,
     '--warmup_steps must be >= 0, got -1'),
    ('peers', ['--batch=7'], 2,
     '--batch 7 is not divisible by the 2 devices'),
    ('train_step', ['--configs=quickstart,nope'], 1,
     "Unknown config 'nope'"),
    ('train_step', ['--batch=7'], 2,
     'batch_size=7 is not divisible by the 2 devices'),
    ('train_step', ['--image_size=16'], 1,
     'images must be at least 32 px'),
    ('conv_shapes', ['--config=nope'], 1, "Unknown config 'nope'"),
    ('conv_shapes', ['--batch=7', '--step_rounds=1'], 2,
     'batch_size=7 is not divisible by the 2 devices'),
    ('conv_shapes', ['--image_size=16'], 1,
     'images must be at least 32 px'),
    ('compile_time', ['--loops=auto'], 1, "Unknown loop 'auto' in --loops"),
    ('compile_time', ['--variants=ResNet7'], 1, 'ResNet7'),
    ('train_loop', ['--steps=2'], 1, 'Loop steps must be >= 3'),
    ('train_loop', ['--configs=nope'], 1, "Unknown config 'nope'"),
    ('input_pipeline', ['--images=0'], 1, '--images must be >= 1, got 0.'),
])
def test_bad_input_is_refused_in_one_line(script, args, devices, message,
                                          tmp_path):
  safe = _SAFE_ARGS[script] + (
      [f'--outdir={tmp_path / "results"}'] if script == 'gpu' else [])
  _assert_refused_in_one_line(_run(script, [*safe, *args], devices), message)


def test_gpu_never_overwrites_results(tmp_path):
  (tmp_path / 'gpu.json').write_text('{}')
  _assert_refused_in_one_line(
      _run('gpu', [*_SAFE_ARGS['gpu'], f'--outdir={tmp_path}']),
      f'--outdir={tmp_path} already holds results (gpu.json)')
  assert (tmp_path / 'gpu.json').read_text() == '{}'


@pytest.mark.skipif(jax.default_backend() != 'cpu',
                    reason='JAX runs on an accelerator here: it would run')
def test_gpu_benchmark_refuses_the_cpu_without_allow_cpu(tmp_path):
  """On a CPU-only JAX it refuses in one line, naming --allow_cpu, before
  compiling anything or creating --outdir."""
  result = _run('gpu', [f'--outdir={tmp_path / "results"}'])
  _assert_refused_in_one_line(result, 'JAX runs on the CPU')
  assert '--allow_cpu' in result.stderr
  assert not (tmp_path / 'results').exists()


def test_gpu_benchmark_runs_every_kind_of_case_on_cpu(tmp_path):
  """The accelerator benchmark at tiny sizes: matmul, step, both loop cases
  (fake arrays, generated JPEGs) and the eval case measured, results
  written, one table printed at the end (the one in gpu.md)."""
  outdir = tmp_path / 'results'
  result = _run('gpu', [
      '--allow_cpu', '--batch=8', '--image_size=32', '--steps=1',
      '--configs=quickstart', '--dtypes=float32', '--matmul_size=64',
      '--loop_config=quickstart', '--loop_image_size=32', '--loop_steps=3',
      '--loops=fake:float32,jpeg:float32', '--jpeg_images=3',
      '--eval_dtypes=float32', '--eval_images=10', '--num_workers=0',
      '--case_s=1', f'--outdir={outdir}'], timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert result.stdout.startswith(
      f'JAX {jax.__version__}, backend {jax.default_backend()}: 1 x ')
  report = json.loads((outdir / 'gpu.json').read_text())
  assert report['skipped'] == [], report['skipped']
  cases = report['cases']
  assert [c['kind'] for c in cases] == [
      'matmul', 'step', 'loop', 'loop', 'eval'], cases
  assert all(c['loop_images_per_second'] > 0 for c in cases
             if c['kind'] == 'loop'), cases
  (evaluation,) = [c for c in cases if c['kind'] == 'eval']
  # Every generated validation image evaluated once per pass, at batch 8.
  assert evaluation['examples'] == 10, evaluation
  assert evaluation['images_per_second'] > 0
  assert evaluation['jpeg_over_memory'] == pytest.approx(
      evaluation['images_per_second']
      / evaluation['memory_images_per_second'])
  table = (outdir / 'gpu.md').read_text().strip()
  assert table in result.stdout
  # One table: one header row, one separator, a row per case.
  assert result.stdout.count('| case | dtype | px | images/s |') == 1
  rows = [line for line in table.splitlines() if line.startswith('| ')]
  assert len(rows) == 1 + len(cases), table
  assert all('not measured' not in row and 'skipped' not in row
             for row in rows), table
  assert '| eval quickstart jpeg | float32 | 32 |' in table
