"""Normalizer-Free ResNets (Brock, De & Smith, ICLR 2021) in JAX/Haiku.

Importing this package adds
`--xla_cpu_experimental_ynn_fusion_type=individual_dot` to XLA_FLAGS (see
`use_fast_cpu_convolutions`). With jax 0.10.2, XLA:CPU sends every
convolution to YNNPACK by default, and YNNPACK's convolutions are slow. The
flag keeps each dot, alone, on YNNPACK and runs convolutions with XLA's own
(Eigen) kernels: an NF-ResNet-50 train step became 1.8x faster at 224 px on
a 2-core CPU (with `=dot`), and 1.13x faster again with `=individual_dot`,
because `=dot` also fused elementwise consumers into the YNNPACK dot, which
then needed every broadcast scalar (1/beta, alpha) materialized as a full
activation-sized array (up to 100 MB each). It only changes the CPU
compiler. Opt out with NFNETS_CPU_CONV_FLAG=0 in the environment, or by
giving any `--xla_cpu_experimental_ynn_fusion_type=...` in XLA_FLAGS
yourself.
"""

import os
import sys

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
OPT_OUT_ENV_VAR = 'NFNETS_CPU_CONV_FLAG'
# jaxlib versions known to accept the flag: an unknown flag in XLA_FLAGS
# aborts the process, and this one is experimental.
_JAXLIB_VERSIONS_WITH_FLAG = ('0.10.2',)


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
  setting = os.environ.get(OPT_OUT_ENV_VAR, '1').strip().lower()
  if setting not in ('1', 'true', 'yes', 'on', '0', 'false', 'no', 'off'):
    raise ValueError(f'{OPT_OUT_ENV_VAR}={os.environ[OPT_OUT_ENV_VAR]!r} is '
                     'not allowed; use 1 (add the flag, the default) or 0.')
  if setting in ('0', 'false', 'no', 'off'):
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


use_fast_cpu_convolutions()
