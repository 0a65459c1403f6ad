"""Run layers of one layout under lax.scan, with their parameters stored stacked.

A deep network traced layer by layer compiles in time proportional to its
depth (minutes for a ResNet-600 on CPU). Under a scan the layout is traced
once, and with the parameters, state and optimizer state of the scanned
layers stored as one array per kind with a leading layer axis (module
'stacked_block2_to_block9/conv0', w [8, 1, 1, 256, 64]) the optimizer and
the stacking add nothing per layer either.

The unrolled network names the same values per layer ('block2/conv0', ...).
stack_modules / unstack_modules convert any tree that holds Haiku
{module: {name: value}} dicts (parameters, state, optimizer state, a whole
train state, or their jax.ShapeDtypeStruct shapes) from one form to the
other, so a checkpoint written either way loads either way.

hk.layer_stack does the scan too, but in Haiku 0.0.17 its transparent mode
writes the state a scanned layer updates (BatchNorm's moving averages) back
under the stacked name unsplit, and its default mode names the stack after
its internal module; hence this module.
"""

from collections.abc import Mapping
from typing import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

# The name the scanned layer function must give its top-level module.
LAYER_NAME = 'layer'
# Module names of stacked layers start with this (see stacked_name).
STACKED_PREFIX = 'stacked_'


def stacked_name(flat_names: Sequence[str]) -> str:
  """The module name of layers flat_names[0..] stored stacked, e.g.
  'stacked_block2_to_block9'."""
  return f'{STACKED_PREFIX}{flat_names[0]}_to_{flat_names[-1]}'


def is_stacked(path) -> bool:
  """Whether a jax key path (from jax.tree_util.tree_map_with_path over
  parameters) leads to a stacked value, whose axis 0 is the layer axis."""
  for key in path:
    name = str(getattr(key, 'key', ''))
    if any(part.startswith(STACKED_PREFIX) for part in name.split('/')):
      return True
  return False


def _rename(modules: Mapping, old: str, new: str) -> dict:
  """The modules named old or old/..., renamed new or new/... (in apply,
  the lifted function sees the enclosing module's other entries too)."""
  return {new + module[len(old):]: entries
          for module, entries in modules.items()
          if module == old or module.startswith(old + '/')}


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
    Parameters and state live under stacked_name(flat_names), each with a
    leading layer axis. Initial values come from a per-layer split of the
    random key, so they differ from an unrolled network's of the same seed
    (same distribution), as do random draws inside the layers (stochastic
    depth).
  """
  num_layers = len(flat_names)
  name = stacked_name(flat_names)
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
    return _rename(params, LAYER_NAME, name), _rename(state, LAYER_NAME, name)

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
      apply_one, x, (_rename(params, name, LAYER_NAME),
                     _rename(state, name, LAYER_NAME), layer_rngs,
                     per_layer_inputs), length=num_layers)
  updater.update(_rename(new_state, LAYER_NAME, name))
  return x, outputs


def _stack_values(values: list):
  """One stacked value from per-layer ones: arrays (numpy or jax) and
  jax.ShapeDtypeStructs get a leading axis; anything else (an optax
  MaskedNode, which holds no data) is kept as it is."""
  first = values[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(values),) + tuple(first.shape),
                                first.dtype, sharding=first.sharding)
  if isinstance(first, np.ndarray):
    return np.stack(values)
  if isinstance(first, jax.Array):
    return jnp.stack(values)
  return first


def _layer_value(value, index: int):
  """Layer `index` of a stacked value (inverse of _stack_values)."""
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(value.shape[1:]), value.dtype,
                                sharding=value.sharding)
  if isinstance(value, (np.ndarray, jax.Array)):
    return value[index]
  return value


def _is_module_dict(tree) -> bool:
  """A Haiku {module path: {name: value}} dict."""
  return (isinstance(tree, Mapping) and bool(tree)
          and all(isinstance(k, str) and isinstance(v, Mapping)
                  and not any(isinstance(e, Mapping) for e in v.values())
                  for k, v in tree.items()))


def _map_module_dicts(fn: Callable, tree):
  """Applies fn to every Haiku module dict inside tree (dicts, lists,
  tuples and named tuples are walked; other values are kept)."""
  if _is_module_dict(tree):
    return fn(tree)
  if isinstance(tree, Mapping):
    return type(tree)({k: _map_module_dicts(fn, v) for k, v in tree.items()})
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):
    return type(tree)(*(_map_module_dicts(fn, v) for v in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_map_module_dicts(fn, v) for v in tree)
  return tree


def _stack_one_group(modules: Mapping, flat_names: Sequence[str]) -> dict:
  target = stacked_name(flat_names)
  position = {name: i for i, name in enumerate(flat_names)}
  result, per_layer = {}, {}
  for module, entries in modules.items():
    parts = module.split('/')
    hit = next((j for j, part in enumerate(parts) if part in position), None)
    if hit is None:
      result[module] = entries
      continue
    stacked_module = '/'.join(parts[:hit] + [target] + parts[hit + 1:])
    per_layer.setdefault(stacked_module, {})[position[parts[hit]]] = entries
  for module, layers in per_layer.items():
    if len(layers) != len(flat_names):
      raise ValueError(f'Cannot stack {module}: it exists for '
                       f'{len(layers)} of the {len(flat_names)} layers '
                       f'{flat_names[0]}..{flat_names[-1]}.')
    result[module] = {
        name: _stack_values([layers[i][name] for i in range(len(flat_names))])
        for name in layers[0]}
  return result


def _unstack_one_group(modules: Mapping, flat_names: Sequence[str]) -> dict:
  target = stacked_name(flat_names)
  result = {}
  for module, entries in modules.items():
    parts = module.split('/')
    if target not in parts:
      result[module] = entries
      continue
    hit = parts.index(target)
    for i, name in enumerate(flat_names):
      result['/'.join(parts[:hit] + [name] + parts[hit + 1:])] = {
          k: _layer_value(v, i) for k, v in entries.items()}
  return result


def stack_modules(tree, groups: Sequence[Sequence[str]]):
  """The stacked form of a tree holding per-layer Haiku dicts.

  groups: the flat layer names scanned together, e.g.
  [['block2', 'block3'], ['block5', 'block6', 'block7']]. Every module under
  a path component in a group ('resnet/block3/conv0') moves to its group's
  stacked name ('resnet/stacked_block2_to_block3/conv0'), its values
  stacked in layer order. Values outside the groups are kept.
  """
  def stack_all(modules):
    for flat_names in groups:
      modules = _stack_one_group(modules, flat_names)
    return modules
  return _map_module_dicts(stack_all, tree)


def unstack_modules(tree, groups: Sequence[Sequence[str]]):
  """Inverse of stack_modules."""
  def unstack_all(modules):
    for flat_names in groups:
      modules = _unstack_one_group(modules, flat_names)
    return modules
  return _map_module_dicts(unstack_all, tree)
