"""Normalizer-Free ResNets (Brock, De & Smith, ICLR 2021) in JAX/Haiku.

Importing nfnets changes no process setting; the command-line entry points
apply the CPU ones (`nfnets.cpu.runtime.configure_process`).
"""
