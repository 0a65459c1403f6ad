"""Soak test of resuming: a training run stopped over and over by random
signals ends bit-identical to an uninterrupted run of the same command.

Runs `train.py --config=configs/quickstart.py` with a short schedule once
uninterrupted (the reference), then --cycles times in another workdir: start
the same command, wait a random time, send SIGKILL, SIGTERM or SIGINT (drawn
at random), wait for the exit. A quarter of the signals go during start-up
and compilation, the rest once the run's log reaches a random step a little
beyond its checkpoint (see `cycle`), so that they land in steps, checkpoint
writes and evaluations while the run is still unfinished for most cycles.
Then the command runs once more to the end, and the final checkpoint (every
array of the train state, and the data iterator state) and the final eval
metrics are compared with the reference's, bitwise (expected on CPU).

An exit after a signal is legal when the process was killed by a signal,
exited with 130 or 143, with a stop code of nfnets.errors (any *_EXIT_CODE
besides the user-error and diverged ones) or with 0; a 'Stopped by SIG... at
step N; checkpoint written' line must name a checkpoint that exists. Deaths
by another signal than the one sent (SIGSEGV, SIGABRT: a crash while
stopping) are legal but counted in the verdict line.

  python -m benchmarks.soak_resume --cycles=30

Prints one row per cycle and a verdict line. Exit code 0 only when every
exit was legal and the final state equals the reference's; 1 otherwise
(the workdirs are then kept).
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import flags
import jax
import numpy as np

import experiment
from benchmarks import harness
from nfnets import checkpointing
from nfnets import cli
from nfnets import errors
from nfnets import metric_writer
from nfnets import sweep

CONFIG = 'configs/quickstart.py'
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
# Shell-style exit codes of SIGINT and SIGTERM (128 + signal number).
SIGNAL_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)
_STOPPED_RE = re.compile(r'Stopped by (SIG\w+) at step ([\d,]+); checkpoint '
                         r'written')
# experiment.py's line once start-up and compilation are over.
_COMPILED = 'Compiled the train step'

_CYCLES = flags.DEFINE_integer('cycles', 30, 'Interrupted starts.')
_STEPS = flags.DEFINE_integer('steps', 600, 'config.train.steps.')
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    'checkpoint_every', 20, 'config.train.checkpoint_every_steps (and '
    'log_every_steps).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the signals and waits.')
_EXIT_TIMEOUT = flags.DEFINE_float(
    'exit_timeout_s', 120, 'Seconds a process may take to exit after a '
    'signal before it counts as hung (and is killed).')
_RUN_TIMEOUT = flags.DEFINE_float(
    'run_timeout_s', 900, 'Seconds an uninterrupted run may take.')
_WORKDIR = flags.DEFINE_string(
    'workdir', '', "Folder for the two runs' workdirs and the logs (must be "
    "empty or absent); '' = a temporary one, removed when the runs match.")


def command(workdir: str) -> list[str]:
  """The train.py command line of both runs."""
  return [sys.executable, 'train.py', f'--config={CONFIG}',
          f'--workdir={workdir}', *overrides()]


def overrides() -> list[str]:
  every = _CHECKPOINT_EVERY.value
  return [f'--config.train.steps={_STEPS.value}',
          f'--config.train.checkpoint_every_steps={every}',
          f'--config.train.log_every_steps={every}']


def _check_flags() -> None:
  for name, value, least in (('cycles', _CYCLES.value, 0),
                             ('steps', _STEPS.value, 1),
                             ('checkpoint_every', _CHECKPOINT_EVERY.value, 1)):
    if value < least:
      raise errors.UserError(f'--{name} must be >= {least}, got {value}.')
  if _WORKDIR.value and os.path.isdir(_WORKDIR.value) and os.listdir(
      _WORKDIR.value):
    raise errors.UserError(f'--workdir={_WORKDIR.value} is not empty: give '
                           'an empty or new folder (both runs start fresh).')


def start(workdir: str, log_path: str) -> subprocess.Popen:
  """train.py in its own process session (setsid), so that a Ctrl-C at
  the terminal stops only this script, which then stops the run; stdout
  and stderr to log_path."""
  with open(log_path, 'wb') as log:
    return subprocess.Popen(command(workdir), cwd=harness.ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def run_to_end(workdir: str, log_path: str) -> tuple[int, float, float | None]:
  """(exit code, seconds, seconds until start-up and compilation were over
  (None if that line did not appear)) of one uninterrupted run."""
  begin = time.monotonic()
  process = start(workdir, log_path)
  compiled = None
  try:
    while process.poll() is None:
      if time.monotonic() - begin > _RUN_TIMEOUT.value:
        raise errors.UserError(
            f'An uninterrupted run took over {_RUN_TIMEOUT.value:.0f} s '
            f'(log: {log_path}); lower --steps or raise --run_timeout_s.')
      if compiled is None and _COMPILED in _read(log_path):
        compiled = time.monotonic() - begin
      time.sleep(0.1)
  finally:
    _stop(process)
  return process.returncode, time.monotonic() - begin, compiled


def _read(path: str) -> str:
  with open(path, errors='replace') as f:
    return f.read()


def _stop(process: subprocess.Popen) -> None:
  if process.poll() is None:
    process.kill()
    process.wait()


def _legal_stop_codes() -> set[int]:
  """Exit codes that say 'stopped by a signal': 130, 143 and nfnets.errors'
  stop codes (every *_EXIT_CODE but the user-error and diverged ones)."""
  other = {getattr(errors, name) for name in dir(errors)
           if name.endswith('_EXIT_CODE')}
  other -= {errors.USER_ERROR_EXIT_CODE, errors.DIVERGED_EXIT_CODE}
  return set(SIGNAL_EXIT_CODES) | other


def judge(returncode: int | None, sent: signal.Signals | None, output: str,
          workdir: str) -> tuple[str, bool, bool]:
  """(what the exit was, whether it is legal, whether the process died by
  another signal than the one sent) for one cycle; sent: the signal sent
  (None if the process exited before)."""
  if returncode is None:
    return f'no exit within {_EXIT_TIMEOUT.value:.0f} s (killed)', False, False
  if returncode < 0:
    name = signal.Signals(-returncode).name
    # Legal too, but another signal (SIGSEGV, SIGABRT) is a crash on the way.
    if sent is not None and -returncode != sent:
      return f'killed by {name} after {sent.name}', True, True
    return f'killed by {name}', True, False
  stopped = _STOPPED_RE.findall(output)
  if stopped:
    name, step = stopped[-1][0], stopped[-1][1].replace(',', '')
    if not os.path.isdir(os.path.join(workdir, 'checkpoints', step)):
      return (f'says {name} stopped it at step {step}, no such checkpoint',
              False, False)
    return f'stopped by {name} at step {step}', returncode in (
        _legal_stop_codes() | {0}), False
  if returncode == 0:
    return (f'finished {"before" if sent is None else "after"} the signal',
            True, False)
  if returncode in _legal_stop_codes():
    return f'stopped (exit {returncode})', True, False
  lines = [l for l in output.splitlines() if l.strip()]
  return f'exit {returncode}: {" | ".join(lines[-2:])}', False, False


_STEP_LINE = re.compile(r'^step (\d[\d,]*)/', re.MULTILINE)


def _logged_step(log_path: str) -> int:
  """The newest step the run's log has reached (0 before the first row)."""
  steps = _STEP_LINE.findall(_read(log_path))
  return int(steps[-1].replace(',', '')) if steps else 0


def cycle(index: int, workdir: str, logs: str, rng: random.Random,
          startup_s: float, step_s: float) -> tuple[list, bool, bool]:
  """One start, a random moment, a random signal and the exit: (table row,
  legal, died by another signal than the one sent).

  A quarter of the signals go at a random time within start-up (from the
  reference's timing); the rest once the log has reached a random step in
  a window of the steps per cycle beyond the checkpoint, plus a
  random part of one log interval, so that most cycles interrupt training
  however fast the machine is at that moment."""
  before = sweep.checkpoint_step(workdir) or 0
  sig = rng.choice(SIGNALS)
  in_startup = rng.random() < 0.25
  window = max(1, round(_STEPS.value / _CYCLES.value))
  target = min(before + rng.randint(1, window), _STEPS.value)
  delay = rng.uniform(0, _CHECKPOINT_EVERY.value * step_s)
  wait_s = rng.uniform(0, startup_s)
  log_path = os.path.join(logs, f'cycle_{index:03d}.log')
  begin = time.monotonic()
  process = start(workdir, log_path)
  sent = reached = None
  try:
    while process.poll() is None and sent is None:
      now = time.monotonic() - begin
      if reached is None and not in_startup and (
          _logged_step(log_path) >= target):
        reached = now
      if (in_startup and now >= wait_s) or (
          reached is not None and now >= reached + delay):
        process.send_signal(sig)
        sent = sig
      time.sleep(0.02)
    if sent is not None:
      try:
        process.wait(timeout=_EXIT_TIMEOUT.value)
      except subprocess.TimeoutExpired:
        pass
  finally:
    returncode = process.poll()
    _stop(process)  # also when the soak itself is interrupted
  seconds = time.monotonic() - begin
  outcome, legal, crashed = judge(returncode, sent, _read(log_path), workdir)
  after = sweep.checkpoint_step(workdir) or 0
  when = (f'{wait_s:.1f} s (start-up)' if in_startup else
          f'step {target} +{delay:.1f} s')
  row = [index, sent.name if sent else '-', when, f'{seconds:.1f}',
         returncode, f'{before} -> {after}',
         outcome if legal else f'ILLEGAL: {outcome} (log: {log_path})']
  return row, legal, crashed


def final_state(workdir: str, config) -> tuple[dict, dict, dict | None]:
  """({array path: host array} of the newest checkpoint's train state, its
  data iterator state, the final eval metrics or None)."""
  exp = experiment.Experiment(config)
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    step = checkpointer.latest_step()
    state, data_state, _ = checkpointer.restore(step, exp.abstract_state())
  finally:
    checkpointer.close()
  leaves = jax.tree_util.tree_flatten_with_path(checkpointing.to_host(state))[0]
  arrays = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in leaves}
  return arrays, data_state, metric_writer.last_eval(workdir, step)


def _bitwise_equal(a: np.ndarray | None, b: np.ndarray | None) -> bool:
  return (a is not None and b is not None and a.dtype == b.dtype
          and a.shape == b.shape and a.tobytes() == b.tobytes())


def differences(reference: str, soaked: str) -> list[str]:
  """What differs between the two workdirs' final states ([] if nothing)."""
  config = sweep.load_config(CONFIG, overrides())
  want_arrays, want_data, want_eval = final_state(reference, config)
  have_arrays, have_data, have_eval = final_state(soaked, config)
  names = sorted(want_arrays.keys() | have_arrays.keys())
  unequal = [name for name in names if not _bitwise_equal(
      want_arrays.get(name), have_arrays.get(name))]
  found = [f'{len(unequal)} of {len(names)} arrays of the train state differ '
           f'(e.g. {", ".join(unequal[:3])})'] if unequal else []
  if want_data != have_data:
    found.append('data iterator state')
  if want_eval is None or want_eval != have_eval:
    found.append(f'final eval metrics {want_eval} vs {have_eval}')
  return found


def main(argv):
  del argv
  _check_flags()
  if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    # An ignored SIGINT (e.g. a background job) stays ignored in children.
    signal.signal(signal.SIGINT, signal.default_int_handler)
  root = _WORKDIR.value or tempfile.mkdtemp(prefix='soak_resume_')
  reference, soaked, logs = (os.path.join(root, name)
                             for name in ('reference', 'soaked', 'logs'))
  os.makedirs(logs, exist_ok=True)
  rng = random.Random(_SEED.value)
  print(f'{_CYCLES.value} cycles of: {" ".join(command(soaked)[1:])}; '
        f'signals {", ".join(s.name for s in SIGNALS)}; seed '
        f'{_SEED.value}; folder {root}', flush=True)

  code, seconds, compiled = run_to_end(reference,
                                       os.path.join(logs, 'reference.log'))
  if code != 0:
    raise errors.UserError(f'The uninterrupted run exited with {code}; see '
                           f'{os.path.join(logs, "reference.log")}.')
  startup = compiled if compiled is not None else seconds / 2
  step_s = (seconds - startup) / _STEPS.value
  print(f'Uninterrupted run: {seconds:.1f} s, {startup:.1f} s of it start-up '
        'and compilation.', flush=True)

  print(harness.markdown_table(['cycle', 'signal', 'sent at', 'exit s',
                                'exit code', 'checkpoint step', 'outcome']),
        flush=True)
  illegal = crashed = 0
  for index in range(1, _CYCLES.value + 1):
    row, legal, other_signal = cycle(index, soaked, logs, rng, startup,
                                     step_s)
    illegal += not legal
    crashed += other_signal
    print(harness.table_row(row), flush=True)

  final_log = os.path.join(logs, 'final.log')
  code, seconds, _ = run_to_end(soaked, final_log)
  problems = [] if code == 0 else [
      f'the final run exited with {code} (log: {final_log})']
  if illegal:
    problems.append(f'{illegal} illegal exits')
  if code == 0:
    problems += differences(reference, soaked)
  if problems:
    print(f'FAIL after {_CYCLES.value} interrupted starts: '
          f'{"; ".join(problems)}. '
          f'Workdirs kept in {root}.', flush=True)
    sys.exit(1)
  print(f'PASS: after {_CYCLES.value} interrupted starts the final '
        'checkpoint (train state, data state) and final eval metrics are '
        'bitwise equal to the uninterrupted run' + (
            f'; {crashed} processes died by another signal than the one '
            'sent (see their logs)' if crashed else '') + '.', flush=True)
  if not _WORKDIR.value:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  cli.run(main)
