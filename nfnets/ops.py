"""The seam between the model code and the platform's fast paths.

`nfnets.layers` writes each primitive the CPU needs rewritten (the
convolution, Scaled Weight Standardization, the bias add, max-pooling and
per-channel sums) once, as its formula, and marks it `@ops.replaceable`.
On GPU and TPU the marked function runs as written: a direct call to XLA.
On CPU, where XLA is slow for some of these shapes, the call goes to the
function of the same name in `CPU_FORMS` (package `nfnets.cpu`: same
arguments, same result up to float32 rounding, faster there).

Which runs is decided when the call is traced:
  * NFNETS_CONV_IMPL=auto (the default): the CPU form when
    `jax.default_backend()` is 'cpu', the formula otherwise;
  * NFNETS_CONV_IMPL=plain: the formula everywhere.
The variable is read once per process, at the first traced call.

With NFNETS_DETERMINISTIC=1 (set by config.deterministic) the primitives
in SCATTER_FREE take their CPU form on every backend: XLA differentiates
the formula's max-pool into select-and-scatter, which has no deterministic
GPU kernel (compilation fails under --xla_gpu_deterministic_ops); the CPU
form routes the gradient by masks.
"""

import functools
import os
from typing import Callable

import jax

from nfnets.cpu import conv as cpu_conv
from nfnets.cpu import reductions as cpu_reductions

IMPL_ENV_VAR = 'NFNETS_CONV_IMPL'
IMPLS = ('auto', 'plain')
DETERMINISTIC_ENV_VAR = 'NFNETS_DETERMINISTIC'
SCATTER_FREE = ('pool_max',)

CPU_FORMS: dict[str, Callable] = {
    'conv2d': cpu_conv.conv2d,
    'standardize_weight': cpu_reductions.standardize_weight,
    'add_bias': cpu_reductions.add_bias,
    'channel_sums': cpu_reductions.channel_sums,
    'pool_max': cpu_reductions.pool_max,
}


@functools.cache
def configured_impl() -> str:
  """NFNETS_CONV_IMPL ('auto' if unset), read once per process; ValueError
  naming the allowed values for anything else."""
  value = os.environ.get(IMPL_ENV_VAR, 'auto').strip().lower() or 'auto'
  if value not in IMPLS:
    raise ValueError(f'{IMPL_ENV_VAR}={os.environ[IMPL_ENV_VAR]!r} is not '
                     f'allowed; use one of {IMPLS}.')
  return value


@functools.cache
def deterministic_requested() -> bool:
  """NFNETS_DETERMINISTIC=1, read once per process."""
  return os.environ.get(DETERMINISTIC_ENV_VAR, '') == '1'


def cpu_forms_active() -> bool:
  """Whether a call traced now takes the CPU forms."""
  return configured_impl() == 'auto' and jax.default_backend() == 'cpu'


def replaceable(formula: Callable) -> Callable:
  """Marks `formula` as a primitive with a CPU form (`CPU_FORMS` under its
  name). The result calls the CPU form when `cpu_forms_active()`, else the
  formula; both stay reachable as `.formula` and `.cpu_form`."""
  if formula.__name__ not in CPU_FORMS:
    raise ValueError(f'No CPU form for {formula.__name__!r}; known: '
                     f'{sorted(CPU_FORMS)}.')
  cpu_form = CPU_FORMS[formula.__name__]
  scatter_free = formula.__name__ in SCATTER_FREE

  @functools.wraps(formula)
  def call(*args, **kwargs):
    use_cpu_form = cpu_forms_active() or (scatter_free
                                          and deterministic_requested())
    return (cpu_form if use_cpu_form else formula)(*args, **kwargs)

  call.formula, call.cpu_form = formula, cpu_form
  return call
