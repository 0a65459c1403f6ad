"""Normalizer-Free ResNets (Brock, De & Smith, ICLR 2021) in JAX/Haiku."""
