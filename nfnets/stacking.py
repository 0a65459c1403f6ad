"""Scanned blocks: run layers of one layout under lax.scan, with their
parameters stored stacked. Everything about this layout lives here; the
ResNet skeleton calls `run_blocks`, checkpoints use `other_layouts`, the
optimizer `is_stacked`.

When (model.block_loop): 'scan' always, 'unrolled' never, 'auto' (the
default) only where it pays: forward-only measurements (SPPs) of networks
deeper than AUTO_SCAN_MAX_UNROLLED_BLOCKS blocks, which are compile-bound,
and never in training, where a scanned step is slower than an unrolled one
and a run takes far more steps than the compile time it saves
(docs/design.md). NF-RegNets always run unrolled.

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
import functools
from typing import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import signal_stats

BLOCK_LOOPS = ('auto', 'scan', 'unrolled')
AUTO_SCAN_MAX_UNROLLED_BLOCKS = 32
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


def scans(block_loop: str, num_blocks: int, forward_only: bool = False
          ) -> bool:
  """Whether a network of num_blocks blocks with model.block_loop =
  block_loop runs its identical blocks scanned (module docstring)."""
  if block_loop == 'auto':
    return forward_only and num_blocks > AUTO_SCAN_MAX_UNROLLED_BLOCKS
  return block_loop == 'scan'


def scan_groups(plan) -> list[tuple[int, int]]:
  """[(first index, count)] of the runs of >= 2 consecutive non-transition
  blocks within a stage: the blocks a scan can share one trace for. plan:
  block records with index, stage and is_transition."""
  groups = []
  for spec in plan:
    if spec.is_transition:
      continue
    first, count = groups[-1] if groups else (-2, 0)
    if first + count == spec.index and plan[first].stage == spec.stage:
      groups[-1] = (first, count + 1)
    else:
      groups.append((spec.index, 1))
  return [group for group in groups if group[1] >= 2]


def _group_names(plan) -> list[list[str]]:
  """The block module names each scan runs: [['block2', 'block3'], ...]."""
  return [[f'block{index}' for index in range(first, first + count)]
          for first, count in scan_groups(plan)]


def convert_layout(tree, plan, scanned: bool):
  """A params / state / optimizer state / train state tree of the network
  of `plan` (or its shapes), rewritten to the scanned (stacked) layout or to
  the unrolled (per-block) one. A tree already in that layout is returned
  unchanged."""
  groups = _group_names(plan)
  if scanned:
    return stack_modules(tree, groups)
  return unstack_modules(tree, groups)


def other_layouts(plan, scanned: bool) -> list:
  """[(to_other, back)]: the conversions between the layout a network
  stores (scanned or not) and the other one, for restoring a checkpoint
  written in either; empty when no blocks would be scanned."""
  if not scan_groups(plan):
    return []
  return [(functools.partial(convert_layout, plan=plan, scanned=not scanned),
           functools.partial(convert_layout, plan=plan, scanned=scanned))]


def run_blocks(make_block: Callable, plan, x, is_training: bool,
               scanned: bool, recorder=None, stage_outputs=None):
  """x through every block of plan in order: x = block_i(x, expected_std_i,
  drop_rate_i, is_training), block_i = make_block(spec_i, name='block<i>').

  Blocks return (output, residual-branch output). With scanned=True each
  run of identical blocks (`scan_groups`) is one scan, its parameters
  stored under `stacked_name`. recorder: a signal_stats.SignalRecorder that
  gets every block's statistics, or None. stage_outputs: a list that gets
  the output of every block with is_stage_end, in order, or None (a scan
  group lies within one stage, so a stage ends only at a group's last
  block, whose output the scan returns). Call inside a Haiku module's
  __call__. Returns the last block's output.
  """
  starts = dict(scan_groups(plan)) if scanned else {}
  index = 0
  while index < len(plan):
    count = starts.get(index, 0)
    if count:
      x, stats = _scanned_blocks(make_block, plan[index:index + count], x,
                                 is_training, recorder is not None)
      if recorder is not None:
        recorder.record_blocks(*stats)
      index += count
    else:
      spec = plan[index]
      x, branch = make_block(spec, name=f'block{index}')(
          x, spec.expected_std, spec.drop_rate, is_training)
      if recorder is not None:
        recorder.record_block(x, branch)
      index += 1
    if stage_outputs is not None and plan[index - 1].is_stage_end:
      stage_outputs.append(x)
  return x


def _scanned_blocks(make_block, specs, x, is_training: bool,
                    with_stats: bool):
  """Blocks of one layout (consecutive non-transition specs) as one scan.
  Returns (x, None or the per-block signal statistics: three [len(specs)]
  arrays)."""

  def one_block(x, expected_std, drop_rate):
    x, branch = make_block(specs[0], name=LAYER_NAME)(
        x, expected_std, drop_rate, is_training)
    if not with_stats:
      return x, None
    return x, (*signal_stats.channel_stats(x),
               signal_stats.channel_stats(branch)[1])

  return scan_layers(
      one_block, [f'block{spec.index}' for spec in specs], x,
      jnp.array([spec.expected_std for spec in specs], jnp.float32),
      jnp.array([spec.drop_rate for spec in specs], jnp.float32))
