"""Stopping a training run cleanly on SIGTERM or SIGINT.

A cluster scheduler sends SIGTERM before it preempts a job; Ctrl-C sends
SIGINT. The first either signal asks the loop to finish its current step,
write a checkpoint and exit with 128 + the signal number (143 after
SIGTERM, 130 after SIGINT: what a shell reports for a process the signal
ended, so job tools see it as interrupted); rerunning the same command
resumes. A second signal exits at once, without a checkpoint.

With several processes, each can receive its signal at a different
moment, so they agree before stopping: at every log step all processes
exchange their flags (one tiny all-gather) and all stop at the first log
step after any of them got a signal. One process checks after every step.
"""

import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
  return 128 + signum


class Stopped(Exception):
  """Training stopped at a step boundary on a signal, checkpoint written;
  scripts print the message and exit with `exit_code`."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = exit_code(signum)


class StopRequest:
  """Between install() and uninstall(), SIGTERM and SIGINT set `signum`
  instead of ending the process (main thread only; elsewhere they keep
  their handlers)."""

  def __init__(self, log=print):
    self.signum = None
    self._log = log
    self._previous = {}

  def install(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def uninstall(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signum is None:
      self.signum = signum
      self._log(f'{name} received: stopping after the current step and '
                'writing a checkpoint (send it again to exit at once).')
      return
    print(f'Second signal ({name}): exiting now without a checkpoint; '
          'rerun the same command to resume from the last one.',
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    # At once, even while the main thread waits in a data pipeline whose
    # threads would keep the interpreter from shutting down; the kernel
    # releases the workdir lock, and a checkpoint being written stays an
    # unfinished temporary folder, never read.
    os._exit(exit_code(signum))

  def should_stop(self, is_log_step: bool) -> bool:
    """Whether to stop after this step; every process must call it after
    every step (multi-process: it is a collective at log steps)."""
    if jax.process_count() == 1:
      return self.signum is not None
    if not is_log_step:
      return False
    flags = multihost_utils.process_allgather(
        np.int32(self.signum or 0))
    signums = [int(s) for s in np.ravel(flags) if s]
    if signums and self.signum is None:
      self.signum = signums[0]  # stopping for another process's signal
    return bool(signums)

  def stopped(self, step: int, checkpoint_written: bool = True) -> Stopped:
    name = signal.Signals(self.signum).name
    written = ('checkpoint written' if checkpoint_written else
               'before training resumed, nothing new to save')
    return Stopped(f'Stopped by {name} at step {step:,}; {written}; '
                   'rerun the same command to resume.', self.signum)
