"""Process settings that make XLA:CPU fast, applied by the entry points
(train.py, eval.py, spp.py and the benchmarks through nfnets.cli.run;
sweep.py's points are train.py processes; the tests' conftest and
workers) through one call, `configure_process()`, before JAX creates its
backend. Importing
nfnets changes nothing. XLA_FLAGS must be set before JAX starts, so this
module imports only the standard library at the top. What each setting
gains is measured in docs/performance.md ("Process settings").

1. The XLA flag `--xla_cpu_experimental_ynn_fusion_type=individual_dot`
   (`use_fast_cpu_convolutions`): XLA:CPU then keeps each dot, alone, on
   YNNPACK and runs convolutions with its own (Eigen) kernels, which are
   faster here than YNNPACK's. Applied only when the installed jaxlib knows
   the flag and its value (an unknown flag in XLA_FLAGS aborts the
   process); NFNETS_CPU_CONV_FLAG=0, or any ynn_fusion_type in XLA_FLAGS,
   leaves XLA_FLAGS alone.

2. Host memory that a train step reuses instead of faulting in again
   (`run_computations_inline`, then `keep_freed_memory` before the first
   train step). XLA:CPU allocates each execution's temporaries as one
   block with malloc (hundreds of MB for a ResNet-50 step); glibc serves a
   block that large with a fresh mmap and unmaps it when it is freed, so
   every step page-faulted all of it in again. With mmap and heap trimming
   off, freed blocks are reused. Only glibc's main arena serves blocks
   that large from its heap, so JAX runs single-device CPU computations on
   the calling thread (`jax_cpu_enable_async_dispatch=False`), and a
   single-device train step is called with its inputs ready. Only on Linux
   with glibc and when JAX can only run on the CPU; NFNETS_KEEP_HOST_MEMORY=0
   turns it off. A training process then keeps its peak heap until it exits.
"""

import ctypes
import functools
import glob
import importlib.metadata
import importlib.util
import mmap
import os
import platform
import sys

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
# What the jaxlib binary holds when XLA knows the flag and its value: the
# flag's name and the enum name the value parses to.
_YNN_FLAG_MARKERS = (b'xla_cpu_experimental_ynn_fusion_type',
                     b'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT')
CONV_FLAG_ENV_VAR = 'NFNETS_CPU_CONV_FLAG'
HOST_MEMORY_ENV_VAR = 'NFNETS_KEEP_HOST_MEMORY'

# mallopt parameters, from <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's freed memory, kept: no mmap for large blocks (served from the heap
# instead), and no trimming of the heap's free top (-1: never; mallopt(3)).
_KEEP_FREED_MEMORY = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: -1}

# kept: whether glibc is set to keep freed memory. inline: whether
# run_computations_inline switched JAX's CPU dispatch to the calling thread.
_host_memory = {'kept': False, 'inline': False}


def switched_on(env_var: str, default: bool = True) -> bool:
  """An on/off environment variable; any other value is an error that names
  the variable and the allowed values."""
  setting = os.environ.get(env_var, '1' if default else '0').strip().lower()
  if setting not in ('1', 'true', 'yes', 'on', '0', 'false', 'no', 'off'):
    raise ValueError(
        f'{env_var}={os.environ[env_var]!r} is not allowed; use 1 (on) or 0 '
        f'(off); the default is {int(default)}.')
  return setting in ('1', 'true', 'yes', 'on')


@functools.cache
def xla_knows_ynn_flag() -> bool:
  """Whether the installed jaxlib's XLA accepts YNN_FLAG: some shared
  library of the jaxlib package holds both the flag's name and its value's
  enum name. Reads the libraries (memory-mapped, about 0.2 s), once."""
  spec = importlib.util.find_spec('jaxlib')
  if spec is None or not spec.submodule_search_locations:
    return False
  found = set()
  for location in spec.submodule_search_locations:
    for path in glob.glob(os.path.join(location, '**', '*.so*'),
                          recursive=True):
      try:
        with open(path, 'rb') as library, mmap.mmap(
            library.fileno(), 0, access=mmap.ACCESS_READ) as contents:
          found.update(m for m in _YNN_FLAG_MARKERS if contents.find(m) >= 0)
      except (OSError, ValueError):  # unreadable or empty
        continue
      if len(found) == len(_YNN_FLAG_MARKERS):
        return True
  return False


def _backends_initialized() -> bool:
  """Whether XLA already read XLA_FLAGS (it does so at backend creation)."""
  if 'jax' not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    return True  # cannot tell: assume too late, change nothing


def use_fast_cpu_convolutions() -> bool:
  """Appends YNN_FLAG to XLA_FLAGS unless opted out; True if it did.

  Does nothing when NFNETS_CPU_CONV_FLAG is 0 (or false/no/off), when
  XLA_FLAGS already mentions ynn_fusion_type (the user's choice wins), when
  the installed jaxlib does not know the flag (`xla_knows_ynn_flag`), or
  when a JAX backend already exists (XLA read XLA_FLAGS then; a later
  change would only reach subprocesses). The changed XLA_FLAGS is
  inherited by subprocesses.
  """
  if not switched_on(CONV_FLAG_ENV_VAR):
    return False
  flags = os.environ.get('XLA_FLAGS', '')
  if 'ynn_fusion_type' in flags:
    return False
  if _backends_initialized() or not xla_knows_ynn_flag():
    return False
  os.environ['XLA_FLAGS'] = f'{flags} {YNN_FLAG}'.strip()
  return True


def _jax_runs_only_on_cpu() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS names cpu first, or no
  accelerator plugin (CUDA/ROCm `jax_plugins`, libtpu) is installed. Looks
  at installed packages only; creates no backend."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if importlib.util.find_spec('libtpu') is not None:
    return False
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  return importlib.util.find_spec('jax_plugins') is None


@functools.cache
def host_memory_setting_applies() -> bool:
  """Not opted out, Linux, glibc and JAX on the CPU only; read once."""
  return (switched_on(HOST_MEMORY_ENV_VAR)
          and platform.system() == 'Linux'
          and platform.libc_ver()[0] == 'glibc' and _jax_runs_only_on_cpu())


def _mallopt(settings: dict[int, int]) -> bool:
  """glibc mallopt(parameter, value) for each item; True if all took."""
  libc = ctypes.CDLL(None)
  return all([libc.mallopt(parameter, value)
              for parameter, value in settings.items()])


def run_computations_inline() -> bool:
  """Makes JAX run single-device CPU computations on the calling thread;
  True if it did (or had done).

  The calling thread allocates from glibc's main arena, which can serve a
  block of any size from its heap once `keep_freed_memory` is set; XLA's
  worker threads have arenas of their own, whose heaps are 64 MB, and
  those mmap larger blocks whatever the settings. JAX reads the option
  when it creates its CPU backend, so this must run before that
  (`configure_process`). It is process-wide: eval, SPP and user code run inline too.
  Changes nothing when the setting does not apply
  (NFNETS_KEEP_HOST_MEMORY=0 opts out) or when a backend already exists.
  """
  if _host_memory['inline']:
    return True
  if not host_memory_setting_applies() or _backends_initialized():
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  _host_memory['inline'] = True
  return True


def computations_run_inline() -> bool:
  """Whether `run_computations_inline` took effect in this process: train
  steps should then be called with ready inputs (`jax.block_until_ready`),
  which XLA runs on the calling thread."""
  return _host_memory['inline']


def keep_freed_memory() -> bool:
  """Called before a train step runs; True if glibc now keeps the memory
  the process frees (mmap and heap trimming off), so each step reuses the
  blocks of the one before instead of faulting fresh pages in.

  For a whole training process: the heap then stays at its peak size.
  Only the first call changes anything. Does nothing unless
  `run_computations_inline` took effect: the step must be called with
  ready inputs, so that XLA allocates its temporaries on the calling thread
  (glibc's main arena, the one that serves blocks that large from its heap
  under these settings).
  """
  if not computations_run_inline():
    return False
  if not _host_memory['kept']:
    if not _mallopt(_KEEP_FREED_MEMORY):
      return False
    _host_memory['kept'] = True
  return True


def release_kept_memory() -> bool:
  """Gives the free memory glibc kept back to the system (malloc_trim);
  True if memory was being kept (now trimmed). The settings stay:
  the next step faults its temporaries in once, then reuses them again.

  For a process that hands the machine to another one for a while
  (benchmarks/peers.py between its timed runs): an idle process holding
  gigabytes of kept heap can slow the next one down.
  """
  if not _host_memory['kept']:
    return False
  ctypes.CDLL(None).malloc_trim(0)
  return True



def configure_process() -> list[str]:
  """Applies the process settings above that apply here (call before JAX
  creates its backend, e.g. first thing in main); returns one line per
  setting in effect, for the entry point to log. Calling it again changes
  nothing more."""
  applied = []
  if use_fast_cpu_convolutions() or YNN_FLAG in os.environ.get('XLA_FLAGS',
                                                               ''):
    applied.append(f'XLA_FLAGS has {YNN_FLAG} (XLA:CPU convolutions on its '
                   'own kernels, dots on YNNPACK)')
  if run_computations_inline():
    applied.append('single-device CPU computations run on the calling '
                   'thread; train steps keep their freed host memory')
  return applied
