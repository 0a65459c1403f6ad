"""What the command-line scripts share: the CPU process settings applied
first (logged with --verbosity=1), config mistakes and other user errors as
one or two lines without a traceback, library INFO logs off.

  if __name__ == '__main__':
    cli.run(main, required=['config', 'workdir'])

Exit codes: 0 done, errors.USER_ERROR_EXIT_CODE (2) for anything the user
can fix, errors.DIVERGED_EXIT_CODE (3) when training diverged, 143 / 130
when SIGTERM / SIGINT stopped it (train.py first writes a checkpoint;
nfnets/preemption.py), 1 (with a traceback) for a bug.
"""

import os
import runpy
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections

from nfnets import errors
from nfnets import ops
from nfnets import preemption
from nfnets.cpu import runtime as cpu_runtime


def _fail(message: str, code: int = errors.USER_ERROR_EXIT_CODE):
  print(f'{os.path.basename(sys.argv[0])}: {message}', file=sys.stderr,
        flush=True)
  sys.exit(code)


def _explain_config_error(argv, error: Exception) -> str:
  """The override or file behind an error raised while parsing --config."""
  values = dict(arg[2:].split('=', 1) for arg in argv[1:]
                if arg.startswith('--') and '=' in arg)
  path = values.get('config')
  if path is not None and not os.path.isfile(path.split(':')[0]):
    return f'config file {path!r} not found (--config={path}).'
  try:
    config = runpy.run_path(path.split(':')[0])['get_config']()
  except Exception:  # pylint: disable=broad-except
    return f'cannot load config file {path!r}: {type(error).__name__}: {error}'
  for name, value in values.items():
    if not name.startswith('config.'):
      continue
    node, walked = config, 'config'
    for part in name.split('.')[1:]:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = (', '.join(sorted(node.keys()))
                 if isinstance(node, ml_collections.ConfigDict) else '')
        return (f'unknown config field {name[len("config."):]!r} in '
                f'--{name}={value}; {walked} has: {known}.')
      node, walked = node[part], f'{walked}.{part}'
  return f'bad config override: {error}'


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f'{e}\nPass --helpshort to see the flags.')
  except Exception as e:  # pylint: disable=broad-except
    _fail(_explain_config_error(argv, e))


def run(main, required=()) -> None:
  """app.run(main) with the behaviour described in the module docstring."""
  flags.mark_flags_as_required(list(required))

  def wrapped(argv):
    try:  # environment switches: a bad value is the user's to fix
      settings = cpu_runtime.configure_process()
      ops.configured_impl()
    except ValueError as e:
      _fail(f'error: {e}')
    for setting in settings:
      logging.debug('CPU process setting: %s', setting)
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs ~40 lines/save
      # orbax also logs the errors it raises (a full disk: 100+ lines from
      # its writer thread); we report those exceptions ourselves.
      logging.get_absl_logger().addFilter(
          lambda record: '/orbax/' not in record.pathname)
    if ('config' in flags.FLAGS
        and flags.FLAGS['config'].flag_type() == 'config object'):
      try:  # config files load lazily: a missing one fails here
        flags.FLAGS.config.keys()
      except Exception as e:  # pylint: disable=broad-except
        _fail(_explain_config_error(sys.argv, e))
    try:
      main(argv)
    except preemption.Stopped as e:
      _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
      _fail('Interrupted (Ctrl-C).', preemption.exit_code(signal.SIGINT))
    except errors.TrainingDiverged as e:
      _fail(f'Training stopped: {e}', errors.DIVERGED_EXIT_CODE)
    except errors.UserError as e:
      _fail(f'error: {e}')
    except OSError as e:
      if not errors.is_disk_full(e):
        raise
      where = f' while writing {e.filename}' if e.filename else ''
      _fail(f'error: no space left on the disk{where}; free space and rerun '
            'the same command (a training run resumes from its last '
            'checkpoint).')

  app.run(wrapped, flags_parser=_parse_flags)
