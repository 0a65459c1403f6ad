"""Normalizer-Free ResNets (Brock, De & Smith, ICLR 2021) in JAX/Haiku.

Importing this package makes XLA:CPU faster (`nfnets/cpu_runtime.py`): it
adds `--xla_cpu_experimental_ynn_fusion_type=individual_dot` to XLA_FLAGS
(opt out: NFNETS_CPU_CONV_FLAG=0). With NFNETS_KEEP_HOST_MEMORY=1 (off by
default), when JAX can only run on the CPU, train steps also reuse freed
host memory instead of page-faulting it in again every step.
"""

from nfnets import cpu_runtime

cpu_runtime.use_fast_cpu_convolutions()
cpu_runtime.share_one_malloc_arena()
