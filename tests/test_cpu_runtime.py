"""The process settings the entry points make for XLA:CPU
(nfnets/cpu/runtime.py), and that importing nfnets makes none."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import experiment
from configs import quickstart
from nfnets.cpu import runtime as cpu_runtime
from nfnets import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Repeated calls of a program with a 64 MB temporary: page faults per call
# with glibc's defaults, then with freed memory kept; then the resident
# memory that releasing the kept memory gives back.
FAULTS_SCRIPT = textwrap.dedent('''
    import json, resource, statistics
    from nfnets.cpu import runtime as cpu_runtime
    cpu_runtime.configure_process()  # first, as a script does
    import jax, jax.numpy as jnp

    @jax.jit
    def program(x):
      y = jnp.sin(x)  # [4096, 4096]: a 64 MB temporary feeding the dot
      return (y @ y[:8].T).sum()

    x = jnp.ones((4096, 4096), jnp.float32)
    compiled = program.lower(x).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes

    def faults_per_call(calls=12):
      """Median page faults per call. With kept memory a few calls still
      fault in a whole temporary: the heap grows while a freed block cannot
      be reused yet (fragmentation)."""
      compiled(x).block_until_ready()
      faults = []
      for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        compiled(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                      - before)
      return statistics.median(faults)

    def resident_bytes():
      with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()

    default = faults_per_call()
    kept = cpu_runtime.keep_freed_memory()
    with_kept = faults_per_call()
    resident_kept = resident_bytes()
    released = cpu_runtime.release_kept_memory()
    print('RESULT' + json.dumps(dict(
        temp_bytes=temp_bytes, default=default, kept=kept,
        with_kept=with_kept, released=released,
        released_bytes=resident_kept - resident_bytes())))
''')


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='glibc malloc settings')
def test_kept_memory_is_not_faulted_in_again_every_call():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         cpu_runtime.HOST_MEMORY_ENV_VAR: '1'}
  result = subprocess.run([sys.executable, '-c', FAULTS_SCRIPT], cwd=ROOT,
                          env=env, text=True, capture_output=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('RESULT')][0]
  values = json.loads(line[len('RESULT'):])
  temp_pages = values['temp_bytes'] / 4096
  assert values['temp_bytes'] >= 64 << 20, values
  # glibc mmaps the temporary afresh each call: every page faults in again.
  assert values['default'] > 0.9 * temp_pages, values
  assert values['kept'], values
  assert values['with_kept'] < 0.05 * temp_pages, values
  # Handed back on request (benchmarks/peers.py, before the peer runs).
  assert values['released'], values
  assert values['released_bytes'] > 0.9 * values['temp_bytes'], values


# Train steps of the MNIST quickstart net at batch 512 (a temporary of
# about 120 MB) through Experiment.train_step, in a process set up as the
# entry points set it: page faults per step, after a warm-up step.
TRAIN_STEP_FAULTS_SCRIPT = textwrap.dedent('''
    import json, resource
    from nfnets.cpu import runtime as cpu_runtime
    cpu_runtime.configure_process()
    import jax
    import experiment
    from configs import quickstart
    from nfnets import data

    config = quickstart.get_config()
    config.train.batch_size = 512
    exp = experiment.Experiment(config)
    state = exp.init_state()
    batches = data.train_iterator(config.data, 512, 0, exp.train_source)
    with jax.set_mesh(exp.mesh):  # jit's call then finds this compile
      temp_bytes = exp._train_step.lower(
          state, exp.shard_batch(next(batches))).compile().memory_analysis(
              ).temp_size_in_bytes
    faults = []
    for _ in range(9):
      batch = next(batches)
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      state, metrics = exp.train_step(state, batch)
      metrics['loss'].block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    - before)
    print('RESULT' + json.dumps(dict(
        inline=cpu_runtime.computations_run_inline(),
        temp_bytes=temp_bytes, faults=faults[1:])))
''')


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='glibc malloc settings')
def test_train_steps_do_not_fault_their_memory_in_again():
  env = {k: v for k, v in os.environ.items()
         if k not in (cpu_runtime.HOST_MEMORY_ENV_VAR, 'XLA_FLAGS')}
  env['JAX_PLATFORMS'] = 'cpu'  # the default setting, one CPU device
  result = subprocess.run([sys.executable, '-c', TRAIN_STEP_FAULTS_SCRIPT],
                          cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('RESULT')][0]
  values = json.loads(line[len('RESULT'):])
  assert values['inline'], values
  temp_bytes = values['temp_bytes']
  assert temp_bytes > 64 << 20, values  # beyond glibc's mmap thresholds
  # A step whose temporary came from a worker thread's arena (a fresh
  # mmap) faults all of it in. One step may too, while the heap grows
  # (fragmentation: a freed block not yet reusable).
  assert sorted(values['faults'])[-2] < 0.3 * temp_bytes / 4096, values


@pytest.fixture
def fresh_policy(monkeypatch):
  """cpu_runtime's state from scratch, computations inline, mallopt calls
  recorded (not made), glibc and a CPU-only JAX assumed."""
  calls = []
  monkeypatch.setattr(cpu_runtime, '_host_memory',
                      {'kept': False, 'inline': True})
  monkeypatch.setattr(cpu_runtime, '_mallopt',
                      lambda settings: calls.append(dict(settings)) or True)
  monkeypatch.setattr(cpu_runtime.platform, 'system', lambda: 'Linux')
  monkeypatch.setattr(cpu_runtime.platform, 'libc_ver',
                      lambda: ('glibc', '2.36'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.delenv(cpu_runtime.HOST_MEMORY_ENV_VAR, raising=False)
  cpu_runtime.host_memory_setting_applies.cache_clear()
  yield calls
  cpu_runtime.host_memory_setting_applies.cache_clear()


@pytest.fixture
def before_backend(fresh_policy, monkeypatch):
  """fresh_policy in a process whose JAX backend does not exist yet;
  jax.config updates recorded (not made)."""
  updates = []
  monkeypatch.setattr(cpu_runtime, '_host_memory',
                      {'kept': False, 'inline': False})
  monkeypatch.setattr(cpu_runtime, '_backends_initialized', lambda: False)
  monkeypatch.setattr(jax.config, 'update',
                      lambda name, value: updates.append((name, value)))
  yield updates


def test_computations_run_inline_by_default(before_backend):
  assert cpu_runtime.run_computations_inline()
  assert before_backend == [('jax_cpu_enable_async_dispatch', False)]
  assert cpu_runtime.computations_run_inline()
  assert cpu_runtime.run_computations_inline()
  assert len(before_backend) == 1


def test_freed_memory_is_kept_from_the_first_step_on(fresh_policy):
  calls = fresh_policy
  assert not cpu_runtime.release_kept_memory()  # nothing kept yet
  assert cpu_runtime.keep_freed_memory()
  # No mmap; trimming never (-1), even past the 2 GB an int threshold
  # reaches: NF-ResNet-50's 3.1 GB temporary at 224 px must stay too.
  assert calls == [{cpu_runtime._M_MMAP_MAX: 0,
                    cpu_runtime._M_TRIM_THRESHOLD: -1}]
  assert cpu_runtime.keep_freed_memory()
  assert len(calls) == 1  # set once per process


@pytest.mark.parametrize('setting', [
    dict(env={'NFNETS_KEEP_HOST_MEMORY': '0'}),
    dict(env={'NFNETS_KEEP_HOST_MEMORY': 'off'}),
    dict(env={'JAX_PLATFORMS': 'cuda,cpu'}),
    dict(libc=('musl', '')),
])
def test_nothing_changes_when_opted_out_or_not_applicable(
    before_backend, fresh_policy, monkeypatch, setting):
  for name, value in setting.get('env', {}).items():
    monkeypatch.setenv(name, value)
  if 'libc' in setting:
    monkeypatch.setattr(cpu_runtime.platform, 'libc_ver',
                        lambda: setting['libc'])
  assert not cpu_runtime.run_computations_inline()
  assert not cpu_runtime.keep_freed_memory()
  assert before_backend == [] and fresh_policy == []


def test_too_late_for_inline_computations_changes_nothing(
    before_backend, fresh_policy, monkeypatch):
  monkeypatch.setattr(cpu_runtime, '_backends_initialized', lambda: True)
  assert not cpu_runtime.run_computations_inline()
  assert not cpu_runtime.keep_freed_memory()
  assert before_backend == [] and fresh_policy == []


def test_bad_switch_value_names_variable_and_choices(fresh_policy,
                                                     monkeypatch):
  monkeypatch.setenv('NFNETS_KEEP_HOST_MEMORY', 'maybe')
  with pytest.raises(
      ValueError, match=r"NFNETS_KEEP_HOST_MEMORY='maybe'.*1 \(on\) or 0"):
    cpu_runtime.host_memory_setting_applies()


def test_train_steps_keep_host_memory(fresh_policy, monkeypatch):
  kept = []
  monkeypatch.setattr(cpu_runtime, 'keep_freed_memory',
                      lambda: kept.append(True))
  config = quickstart.get_config()
  config.model.width = 0.125
  exp = experiment.Experiment(config)
  state = exp.init_state()
  iterator = data.train_iterator(config.data, config.train.batch_size, 0,
                                 exp.train_source)
  losses = []
  for _ in range(2):
    state, metrics = exp.train_step(state, next(iterator))
    losses.append(float(metrics['loss']))
  assert len(kept) == 2
  # The train loop's compiled step too.
  accumulator = exp.new_accumulator()
  step_fn = exp.compile_loop_step(state, accumulator)
  state, accumulator, _ = step_fn(state, exp.shard_batch(next(iterator)),
                                  accumulator)
  losses.append(float(accumulator['sums']['loss']))
  assert len(kept) == 3
  assert np.all(np.isfinite(losses))


# Imports every module of nfnets/ (and experiment.py) in a fresh process
# and reports what that changed: the environment and every JAX config
# value. The third-party packages they use are imported first: opencv sets
# LD_LIBRARY_PATH when imported.
IMPORT_SCRIPT = textwrap.dedent('''
    import importlib, json, os, pkgutil
    import cv2, grain, haiku, jax, optax, orbax.checkpoint
    import tensorflow_datasets
    import nfnets
    before_env = dict(os.environ)
    before_config = {name: repr(value)
                     for name, value in jax.config.values.items()}
    names = [info.name for info in pkgutil.walk_packages(
        nfnets.__path__, 'nfnets.')]
    for name in names + ['experiment']:
      importlib.import_module(name)
    after_config = {name: repr(value)
                    for name, value in jax.config.values.items()}
    from jax._src import xla_bridge
    print('RESULT' + json.dumps(dict(
        modules=len(names),
        env_changed=sorted(k for k in set(before_env) | set(os.environ)
                           if before_env.get(k) != os.environ.get(k)),
        config_changed=sorted(k for k in after_config
                              if after_config[k] != before_config.get(k)),
        backend_started=xla_bridge.backends_are_initialized())))
''')


def test_importing_nfnets_changes_no_process_setting():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run([sys.executable, '-c', IMPORT_SCRIPT], cwd=ROOT,
                          env=env, text=True, capture_output=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('RESULT')][0]
  values = json.loads(line[len('RESULT'):])
  assert values['modules'] >= 20, values
  assert values == dict(modules=values['modules'], env_changed=[],
                        config_changed=[], backend_started=False)


def test_configure_process_sets_the_flag_by_capability(monkeypatch):
  monkeypatch.setattr(cpu_runtime, '_backends_initialized', lambda: False)
  monkeypatch.setattr(cpu_runtime, 'run_computations_inline', lambda: False)
  monkeypatch.delenv(cpu_runtime.CONV_FLAG_ENV_VAR, raising=False)
  # The installed jaxlib knows the flag: it is added, once.
  assert cpu_runtime.xla_knows_ynn_flag()
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/nowhere')
  lines = cpu_runtime.configure_process()
  assert os.environ['XLA_FLAGS'] == (
      f'--xla_dump_to=/nowhere {cpu_runtime.YNN_FLAG}')
  assert len(lines) == 1 and cpu_runtime.YNN_FLAG in lines[0]
  cpu_runtime.configure_process()
  assert os.environ['XLA_FLAGS'].count('ynn_fusion_type') == 1
  # A jaxlib without it, an opt-out, or the user's own value: untouched.
  monkeypatch.setattr(cpu_runtime, 'xla_knows_ynn_flag', lambda: False)
  monkeypatch.setenv('XLA_FLAGS', '')
  assert cpu_runtime.configure_process() == []
  assert os.environ['XLA_FLAGS'] == ''
  monkeypatch.setattr(cpu_runtime, 'xla_knows_ynn_flag', lambda: True)
  monkeypatch.setenv(cpu_runtime.CONV_FLAG_ENV_VAR, '0')
  assert cpu_runtime.configure_process() == []
  monkeypatch.delenv(cpu_runtime.CONV_FLAG_ENV_VAR)
  mine = '--xla_cpu_experimental_ynn_fusion_type=dot'
  monkeypatch.setenv('XLA_FLAGS', mine)
  assert cpu_runtime.configure_process() == []
  assert os.environ['XLA_FLAGS'] == mine


def test_entry_points_log_the_settings_they_apply():
  """cli.run (train.py, eval.py, spp.py, the benchmarks) applies the
  settings before main and logs them at --verbosity=1."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run(
      [sys.executable, '-c', textwrap.dedent('''
          import sys
          from absl import flags
          from nfnets import cli
          def main(argv):
            import os
            print('FLAGS=' + os.environ.get('XLA_FLAGS', ''))
          sys.argv = ['entry', '--verbosity=1']
          cli.run(main)
      ''')], cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'FLAGS={cpu_runtime.YNN_FLAG}' in result.stdout
  assert 'CPU process setting: XLA_FLAGS has' in result.stderr


@pytest.mark.parametrize('variable,value', [
    ('NFNETS_KEEP_HOST_MEMORY', 'maybe'), ('NFNETS_CPU_CONV_FLAG', 'sure'),
    ('NFNETS_CONV_IMPL', 'fast')])
def test_bad_switch_in_the_environment_is_one_line_at_start(variable, value):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env[variable] = value
  result = subprocess.run(
      [sys.executable, 'spp.py', '--config=configs/spp/quick.py',
       '--config.output_dir=/nonexistent/never'], cwd=ROOT, env=env,
      text=True,
      capture_output=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"{variable}='{value}' is not allowed" in result.stderr
  assert result.stderr.strip().count('\n') == 0, result.stderr
