"""Normalizer-Free ResNets (Brock, De & Smith, ICLR 2021) in JAX/Haiku.

Importing this package makes XLA:CPU faster (`nfnets/cpu_runtime.py`): it
adds `--xla_cpu_experimental_ynn_fusion_type=individual_dot` to XLA_FLAGS
(opt out: NFNETS_CPU_CONV_FLAG=0). When JAX can only run on the CPU, it also
makes JAX run single-device computations on the calling thread, so that
train steps reuse their freed host memory instead of page-faulting it in
again every step (opt out: NFNETS_KEEP_HOST_MEMORY=0).
"""

from nfnets import cpu_runtime

cpu_runtime.use_fast_cpu_convolutions()
cpu_runtime.run_computations_inline()
