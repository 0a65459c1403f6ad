"""Run layers of one layout under lax.scan, with per-layer parameter names.

A deep network traced layer by layer compiles in time proportional to its
depth (minutes for a ResNet-600 on CPU). Under a scan the layout is traced
once. `scan_layers` keeps the parameter and state tree of the unrolled
network ('block7/conv0', ...), so checkpoints load whichever way a network
runs: it stacks the per-layer entries for the scan and splits them back.

hk.layer_stack(transparent=True) does the same for parameters, but in Haiku
0.0.17 it writes the state a scanned layer updates (BatchNorm's moving
averages) back under the stacked name, unsplit; hence this module.
"""

from typing import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

# The name the scanned layer function must give its top-level module.
LAYER_NAME = 'layer'


def _split(stacked: dict, flat_names: Sequence[str]) -> dict:
  """{'layer/..': {k: [L, ...]}} -> {'<flat_names[i]>/..': {k: [...]}}."""
  return {name + module[len(LAYER_NAME):]:
              {k: v[i] for k, v in entries.items()}
          for module, entries in stacked.items()
          for i, name in enumerate(flat_names)}


def _stack(flat: dict, flat_names: Sequence[str]) -> dict:
  """Inverse of _split; entries of modules outside the layers are ignored."""
  first = flat_names[0]
  suffixes = [module[len(first):] for module in flat
              if module == first or module.startswith(first + '/')]
  return {LAYER_NAME + suffix: {
      k: jnp.stack([flat[name + suffix][k] for name in flat_names])
      for k in flat[first + suffix]} for suffix in suffixes}


def scan_layers(layer_fn: Callable, flat_names: Sequence[str], x,
                *per_layer_inputs):
  """Applies len(flat_names) layers of one layout in sequence, as one scan.

  Call inside a Haiku module's __call__ (not another method: Haiku would
  prefix the names with the method's).

  Args:
    layer_fn: (x, *inputs_of_one_layer) -> (x, per_layer_output); it must put
      every module it creates under one top-level module named LAYER_NAME
      and return x with its input's shape and dtype.
    flat_names: the module name of each layer in the unrolled network, in
      order, e.g. ['block3', 'block4', 'block5'].
    x: the first layer's input.
    *per_layer_inputs: arrays [len(flat_names), ...], row i for layer i.

  Returns:
    (the last layer's output, the per-layer outputs stacked on axis 0).
    Parameters and state live under the flat names; the initial values come
    from a per-layer split of the random key, so they differ from an
    unrolled network's of the same seed (same distribution), as do random
    draws inside the layers (stochastic depth).
  """
  num_layers = len(flat_names)
  layer = hk.transform_with_state(layer_fn)

  def split_key(rng):
    return (None, None, None) if rng is None else tuple(jax.random.split(rng, 3))

  def init_all(x, rng):
    def init_one(carry, inputs):
      x, rng = carry
      rng, init_rng, apply_rng = split_key(rng)
      params, state = layer.init(init_rng, x, *inputs)
      (x, _), state = layer.apply(params, state, apply_rng, x, *inputs)
      return (x, rng), (params, state)
    _, (params, state) = jax.lax.scan(init_one, (x, rng), per_layer_inputs,
                                      length=num_layers)
    return _split(params, flat_names), _split(state, flat_names)

  init_params_and_state, updater = hk.experimental.transparent_lift_with_state(
      init_all, allow_reuse=True)
  params, state = init_params_and_state(x, hk.maybe_next_rng_key())
  rng = hk.maybe_next_rng_key()
  layer_rngs = None if rng is None else jax.random.split(rng, num_layers)

  def apply_one(x, scanned):
    params, state, rng, inputs = scanned
    (x, output), state = layer.apply(params, state, rng, x, *inputs)
    return x, (output, state)

  x, (outputs, new_state) = jax.lax.scan(
      apply_one, x, (_stack(params, flat_names), _stack(state, flat_names),
                     layer_rngs, per_layer_inputs), length=num_layers)
  updater.update(_split(new_state, flat_names))
  return x, outputs
