import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax


def jitted(model):
  """(init, apply) of a transformed model, jitted with is_training static.

  Eager Haiku compiles every op on its own (about 0.1 s each on this CPU), so
  tests always jit. Call init(rng, images, is_training) and
  apply(params, state, rng, images, is_training, return_stats=False).
  """
  init = jax.jit(model.init, static_argnums=2)
  apply = jax.jit(model.apply, static_argnums=(4, 5))
  return init, lambda p, s, r, x, train, stats=False: apply(p, s, r, x, train,
                                                            stats)
