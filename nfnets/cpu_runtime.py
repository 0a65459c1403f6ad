"""Process-wide settings that make XLA:CPU fast; `nfnets` applies them on
import. XLA_FLAGS must be set before JAX starts, so this module imports only
the standard library at the top, and jax inside `run_computations_inline`.

1. The XLA flag `--xla_cpu_experimental_ynn_fusion_type=individual_dot`
   (`use_fast_cpu_convolutions`). With jax 0.10.2, XLA:CPU sends every
   convolution to YNNPACK by default, and YNNPACK's convolutions are slow.
   The flag keeps each dot, alone, on YNNPACK and runs convolutions with
   XLA's own (Eigen) kernels: an NF-ResNet-50 train step became 1.8x faster
   at 224 px on a 2-core CPU (with `=dot`), and 1.13x faster again with
   `=individual_dot`, because `=dot` also fused elementwise consumers into
   the YNNPACK dot, which then needed every broadcast scalar (1/beta,
   alpha) materialized as a full activation-sized array (up to 100 MB
   each). It only changes the CPU compiler. Opt out with
   NFNETS_CPU_CONV_FLAG=0, or by giving any
   `--xla_cpu_experimental_ynn_fusion_type=...` in XLA_FLAGS yourself.

2. Host memory that a train step reuses instead of faulting in again
   (`run_computations_inline` on import, `keep_freed_memory` before a
   train step). XLA:CPU allocates each execution's temporaries as one
   block with malloc: 363 MB for an NF-ResNet-50 train step at 64 px,
   batch 32, 3.1 GB at 224 px. glibc serves a block that large with a
   fresh mmap and unmaps it when it is freed, so every step page-faulted
   all of it in again: 88,700 minor faults per step at 64 px, 800,000 at
   224 px. With mmap and heap trimming off, freed blocks are reused: about
   zero faults per step at 64 px, and the step 1.11-1.21x as fast at 64 px
   and 1.18-1.21x at 224 px. The settings are process-wide, but only
   glibc's main arena serves blocks of hundreds of MB from its heap: a
   thread's own arena mmaps any block over its 64 MB heaps whatever they
   say. So JAX runs single-device CPU computations inline, on the calling
   thread (`jax_cpu_enable_async_dispatch=False`), and a single-device
   train step is called with its inputs ready (else XLA defers it to a
   worker thread). On by default; NFNETS_KEEP_HOST_MEMORY=0 turns both
   off. Only on Linux with glibc and when JAX can only run on the CPU (an
   accelerator keeps the working memory on the device). An earlier form
   put every thread on the main arena instead (M_ARENA_MAX=1): that slowed
   the MNIST quickstart's training from 16 to 24-27 s, so it was opt-in.
"""

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import platform
import sys

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
CONV_FLAG_ENV_VAR = 'NFNETS_CPU_CONV_FLAG'
HOST_MEMORY_ENV_VAR = 'NFNETS_KEEP_HOST_MEMORY'
# jaxlib versions known to accept the flag: an unknown flag in XLA_FLAGS
# aborts the process, and this one is experimental.
_JAXLIB_VERSIONS_WITH_FLAG = ('0.10.2',)

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


def _jaxlib_version() -> str | None:
  try:
    from jaxlib import version  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return version.__version__


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
  the installed jaxlib is not one known to accept the flag, or when a JAX
  backend already exists (XLA read XLA_FLAGS then; a later change would only
  reach subprocesses). The changed XLA_FLAGS is inherited by subprocesses.
  """
  if not switched_on(CONV_FLAG_ENV_VAR):
    return False
  flags = os.environ.get('XLA_FLAGS', '')
  if 'ynn_fusion_type' in flags:
    return False
  if _jaxlib_version() not in _JAXLIB_VERSIONS_WITH_FLAG:
    return False
  if _backends_initialized():
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
  when it creates its CPU backend, so this must run before that (on
  import). It is process-wide: eval, SPP and user code run inline too.
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
  (benchmarks/peers.py between its timed runs): on this project's VMs,
  an idle process holding 4.5 GB of kept heap made timm's 224 px train
  step 20-30% slower, although its memory was never short.
  """
  if not _host_memory['kept']:
    return False
  ctypes.CDLL(None).malloc_trim(0)
  return True

