"""Trained weights without the training run: one file to share, and one
reader for both that file and a workdir's newest checkpoint.

A weights file is a single .safetensors file (a header of names, dtypes and
shapes, then raw little-endian arrays: reading it never executes code):
  params/<haiku module>/<name>      the parameters
  bn_state/<haiku module>/<name>    BatchNorm moving statistics (if any)
  ema_params/<haiku module>/<name>  the EMA of the parameters (if kept)
and in its metadata the config that defines the network ('nfnets_config',
JSON) and the format ('nfnets_format'). Haiku module names contain '/'; the
parameter name is the part after the last one.

`read` is what eval.py --weights, predict.py and config.init_from use.
"""

import dataclasses
import json
import os
import struct

import ml_collections
import numpy as np

from nfnets import checkpointing
from nfnets import errors
from nfnets import models

FORMAT = 'nfnets-weights-1'
SUFFIX = '.safetensors'
_GROUPS = ('params', 'bn_state', 'ema_params')
# First bytes of files that must never be unpickled: a torch zip archive
# (torch.save since 1.6) and a raw pickle stream (protocol 2-5).
_PICKLE_MAGICS = (b'PK\x03\x04', b'\x80\x02', b'\x80\x03', b'\x80\x04',
                  b'\x80\x05')


@dataclasses.dataclass
class Weights:
  """Haiku trees of numpy arrays and the config that defines them."""
  params: dict
  bn_state: dict
  ema_params: dict | None
  config_dict: dict
  source: str  # for messages: 'weights file X' or 'workdir W, step N'


def _flatten(prefix: str, tree: dict) -> dict[str, np.ndarray]:
  return {f'{prefix}/{module}/{name}': np.asarray(value, order='C')
          for module, entries in tree.items()
          for name, value in entries.items()}


def _unflatten(flat: dict[str, np.ndarray], prefix: str) -> dict:
  tree = {}
  for key, value in flat.items():
    if key.startswith(prefix + '/'):
      module, name = key[len(prefix) + 1:].rsplit('/', 1)
      tree.setdefault(module, {})[name] = value
  return tree


def save_weights(path: str, params, bn_state, config_dict: dict,
                 ema_params=None) -> None:
  """Writes the weights file `path` (atomically; refuses an existing one).

  params, bn_state, ema_params: Haiku dicts {module: {name: array}} (numpy
  or jax arrays); config_dict: the full config (workdir.config_to_dict).
  """
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  if os.path.exists(path):
    raise errors.UserError(f'{path} exists; choose another output path '
                           '(weights files are never overwritten).')
  if not path.endswith(SUFFIX):
    raise errors.UserError(f'A weights file name ends with {SUFFIX}, not '
                           f'{os.path.basename(path)!r}.')
  tensors = _flatten('params', params) | _flatten('bn_state', bn_state or {})
  if ema_params:
    tensors |= _flatten('ema_params', ema_params)
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise errors.UserError(f'Cannot create the folder of {path}: '
                           f'{e.strerror} ({e.filename}).') from None
  partial = f'{path}.partial-{os.getpid()}'
  try:
    safetensors_numpy.save_file(tensors, partial, metadata={
        'nfnets_format': FORMAT,
        'nfnets_config': json.dumps(config_dict, sort_keys=True)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)  # a file to share (the library: 0600)
    os.link(partial, path)  # fails if path appeared meanwhile: never replace
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _check_safetensors(path: str) -> dict:
  """The file's metadata; UserError for a pickle, a truncated file or
  another format."""
  with open(path, 'rb') as f:
    head = f.read(8)
    if head.startswith(_PICKLE_MAGICS):
      raise errors.UserError(
          f'{path} is a pickle or torch.save file; it is not read because '
          'unpickling runs code. Use the .safetensors file (e.g. timm\'s '
          'model.safetensors).')
    size = os.fstat(f.fileno()).st_size
    if len(head) < 8:
      raise errors.UserError(f'{path} is not a safetensors file '
                             f'({size} bytes).')
    header_size = struct.unpack('<Q', head)[0]
    if header_size > size - 8 or header_size > 100 * 2**20:
      raise errors.UserError(f'{path} is not a safetensors file, or it is '
                             f'truncated ({size:,} bytes).')
    try:
      header = json.loads(f.read(header_size))
      end = max((entry['data_offsets'][1] for name, entry in header.items()
                 if name != '__metadata__'), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
      raise errors.UserError(f'{path} is not a safetensors file (its header '
                             'is not a safetensors tensor table).') from None
  if 8 + header_size + end > size:
    raise errors.UserError(
        f'{path} is truncated: {size:,} bytes of the {8 + header_size + end:,}'
        ' its header describes. Download or copy it again.')
  return header.get('__metadata__') or {}


def load_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """(name -> array, metadata) of a safetensors file, after the checks of
  _check_safetensors."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise errors.UserError(f'Weights file {path!r} does not exist.')
  metadata = _check_safetensors(path)
  try:
    return safetensors_numpy.load_file(path), metadata
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f'{path} cannot be read as safetensors: '
                           f'{str(e).splitlines()[0][:200]}') from None


def _read_file(path: str) -> Weights:
  flat, metadata = load_safetensors(path)
  if metadata.get('nfnets_format') != FORMAT:
    raise errors.UserError(
        f'{path} is not an nfnets weights file (format '
        f'{metadata.get("nfnets_format")!r}). Convert timm weights first: '
        'python -m tools.convert_timm (docs/pretrained.md).')
  try:
    config_dict = json.loads(metadata['nfnets_config'])
  except (KeyError, ValueError):
    raise errors.UserError(f'{path} has no readable config in its metadata; '
                           'it is damaged or was not written by nfnets.'
                           ) from None
  return Weights(params=_unflatten(flat, 'params'),
                 bn_state=_unflatten(flat, 'bn_state'),
                 ema_params=_unflatten(flat, 'ema_params') or None,
                 config_dict=config_dict, source=f'weights file {path}')


def _read_workdir(workdir: str, warn) -> Weights:
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  try:
    found = checkpointer.restore_latest_intact(None, warn=warn)
  finally:
    checkpointer.close()
  if found is None:
    raise errors.UserError(f'No checkpoint in {checkpointer.directory}.')
  step, state, _, config_dict = found
  if config_dict is None:
    raise errors.UserError(
        f'The checkpoint of step {step} in {workdir} does not record its '
        'config (written by an older version); it cannot be read as weights.')
  host = checkpointing.to_host(state)
  return Weights(params=host['params'], bn_state=host.get('bn_state') or {},
                 ema_params=host.get('ema_params') or None,
                 config_dict=config_dict,
                 source=f'workdir {workdir}, checkpoint step {step}')


def read(path: str, warn=print) -> Weights:
  """The weights in a weights file or a workdir (its newest intact
  checkpoint, read-only; warn hears of damaged newer ones)."""
  if os.path.isdir(path):
    if not os.path.isdir(os.path.join(path, 'checkpoints')):
      raise errors.UserError(
          f'{path} is a folder without checkpoints/; give a workdir of a '
          f'training run or a weights file (*{SUFFIX}).')
    return _read_workdir(path, warn)
  if not os.path.exists(path):
    raise errors.UserError(f'{path!r} does not exist; give a workdir of a '
                           f'training run or a weights file (*{SUFFIX}).')
  return _read_file(path)


def model_config(weights: Weights) -> ml_collections.ConfigDict:
  """The model config stored with the weights."""
  return ml_collections.ConfigDict(weights.config_dict['model'])


# Model fields a run may set differently from the weights it reads: the
# head's size, regularization, values used only at initialization or in
# training, and how blocks are stored. Every other field changes what the
# network computes (most without changing any parameter's shape).
FREE_MODEL_FIELDS = ('num_classes', 'dropout_rate', 'stochastic_depth_rate',
                     'stochastic_depth_scale_by_keep', 'skip_gain_init',
                     'bn_decay', 'block_loop', 'bn_axis_name')


def check_same_network(weights: Weights, model_config) -> None:
  """UserError naming the model fields (outside FREE_MODEL_FIELDS) whose
  values differ from those the weights were made with. Fields the weights'
  config does not record are not compared."""
  stored = weights.config_dict.get('model', {})
  current = json.loads(model_config.to_json_best_effort())
  changed = [f'model.{name} {stored[name]!r} (this config: '
             f'{current.get(name)!r})'
             for name in sorted(stored)
             if name not in FREE_MODEL_FIELDS and name in current
             and stored[name] != current[name]]
  if changed:
    raise errors.UserError(
        f'{weights.source} was made with ' + ', '.join(changed[:4])
        + (' ...' if len(changed) > 4 else '') + '. Use the config it was '
        'made with' + (' (configs/nf_resnet50_timm.py or its 26 / 101 '
                       'variants)' if stored.get('ws_form') == 'timm' else '')
        + ' or set those fields to match.')


CLASSIFIER = 'classifier'  # the Haiku module name of every model's head


def _flat(tree: dict) -> dict[str, object]:
  return {f'{module}/{name}': value for module, entries in tree.items()
          for name, value in entries.items()}


def transplant(fresh: dict, loaded: dict, what: str,
               new_classifier: bool = False) -> tuple[dict, list[str]]:
  """`fresh` (a new model's Haiku tree) with every array taken from `loaded`
  where the names and shapes agree; the classifier is kept fresh when its
  shape differs (another num_classes), or always with new_classifier.

  Returns (tree, names of the modules kept fresh). Raises
  UserError naming the first array missing from `loaded` or shaped
  differently outside the classifier, and arrays of `loaded` the model has
  no place for. what: 'params' or 'bn_state', for messages.
  """
  fresh_flat, loaded_flat = _flat(fresh), _flat(loaded)
  notes, problems = [], []
  for name, value in fresh_flat.items():
    is_head = name.split('/')[-2] == CLASSIFIER
    if name not in loaded_flat:
      if not is_head:
        problems.append(f'{what} {name} is missing from them')
      continue
    old_shape = tuple(np.shape(loaded_flat[name]))
    if old_shape != tuple(np.shape(value)):
      if is_head:
        notes.append(f'{name} {list(old_shape)} -> {list(np.shape(value))}')
      else:
        problems.append(f'{what} {name} is {list(old_shape)} there, '
                        f'{list(np.shape(value))} in this model')
  unused = sorted(set(loaded_flat) - set(fresh_flat))
  if unused:
    problems.append(f'{len(unused)} of their {what} arrays have no place in '
                    f'this model (first: {unused[0]})')
  if problems:
    raise errors.UserError('The weights do not fit the configured model: '
                           + '; '.join(problems[:3]) + '. Check model.variant, '
                           'model.width and the other model fields.')
  reinitialized = {name.split(' ')[0].rsplit('/', 1)[0] for name in notes}
  if new_classifier:
    reinitialized |= {module for module in fresh
                      if module.split('/')[-1] == CLASSIFIER}
  reinitialized |= {name.rsplit('/', 1)[0] for name in fresh_flat
                    if name not in loaded_flat}
  tree = {module: {
      name: (value if module in reinitialized else
             np.asarray(loaded[module][name], np.asarray(value).dtype))
      for name, value in entries.items()} for module, entries in fresh.items()}
  return tree, sorted(reinitialized)


def in_model_layout(params: dict, model_config, expected_params: dict) -> dict:
  """params converted to the layout of model_config's network (scanned or
  unrolled blocks, models.other_layouts) when stored in the other one;
  expected_params: the model's parameter tree (shapes suffice)."""
  for _, back in models.other_layouts(model_config):
    if set(params) != set(expected_params):
      params = checkpointing.to_host(back(params))
  return params


def check_fits(weights: Weights, model_config, expected: dict, loaded: dict,
               what: str = 'params') -> None:
  """UserError unless `loaded` (params or bn_state of `weights`, in the
  model's layout) can run as model_config's network, whose tree is
  `expected` (shapes suffice): the model fields first (check_same_network),
  then every array's name and shape."""
  check_same_network(weights, model_config)
  mismatch = checkpointing.describe_mismatch(expected, loaded)
  if mismatch:
    raise errors.UserError(f'The {what} of {weights.source} do not fit the '
                           f'configured model: {mismatch}.')
