"""Classifies image files with a trained model: the top-k classes per image.

  python predict.py --config=configs/folder.py --workdir=runs/my_images \
      photo.jpg more_photos/ [--top_k=5] [--json] [--batch_size=32] \
      [--ema=auto|yes|no]
  python predict.py --config=CONFIG --weights=model.safetensors photos/

Each PATH is an image file or a folder (searched recursively for .jpg,
.jpeg and .png files, sorted; other files are ignored). The parameters come
from the workdir's newest intact checkpoint (read-only) or a weights file
(nfnets/weights.py), the EMA parameters when they exist (--ema=auto);
the network from --config's model, which must have the same parameter
shapes. Images get the config's evaluation preprocessing (center crop or
resize to the eval image size) and normalization.

Prints one line per image, 'path: name1 0.873, name2 0.051, ...' (softmax
probabilities), or with --json one JSON list of {path, top_k: [{class,
name, probability}]} and nothing else on stdout. An image that cannot be
read is reported on its line ({path, error} in JSON) and skipped; the exit
code is 0 when at least one image was classified. Class names: the
workdir's class_names.json, else the config's dataset (data.class_names),
else the class indices.
"""

import copy
import json
import os
import sys
from typing import Iterator, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import experiment
from nfnets import cli
from nfnets import data
from nfnets import errors
from nfnets import folder
from nfnets import models
from nfnets import weights as weights_lib
from nfnets import workdir as workdir_lib

EMA_CHOICES = ('auto', 'yes', 'no')


def _warn(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def collect_images(paths: Sequence[str]) -> list[str]:
  """Image files to classify: a file as given, a folder's image files
  (recursively, sorted); each once, in argument order. UserError for a path
  that does not exist or when no image file is found."""
  found = []
  for path in paths:
    if os.path.isdir(path):
      try:
        names = folder.find_images(path)
      except OSError as e:  # e.g. a subfolder without read permission
        raise errors.UserError(f'Cannot list {e.filename or path!r}: '
                               f'{e.strerror or e}.') from None
      found += [os.path.join(path, name) for name in names]
    elif os.path.exists(path):
      found.append(path)
    else:
      raise errors.UserError(f'{path!r} does not exist; give image files or '
                             'folders of images.')
  if not found:
    raise errors.UserError(
        f'No image files ({", ".join(folder.IMAGE_EXTENSIONS)}) in '
        f'{", ".join(paths)}.')
  return list(dict.fromkeys(found))


def eval_model(config):
  """config's model for evaluation: no cross-device BatchNorm axis."""
  model_config = copy.deepcopy(config.model)
  model_config.bn_axis_name = None
  return models.build(model_config)


def load_parameters(config, weights_path: str, ema: str,
                    warn=_warn) -> tuple[dict, dict, str]:
  """(params, bn_state, description) of a workdir or weights file, checked
  against config.model's shapes; ema: 'auto' (EMA when present), 'yes',
  'no'."""
  if ema not in EMA_CHOICES:
    raise errors.UserError(f'--ema={ema!r}; allowed: {EMA_CHOICES}.')
  loaded = weights_lib.read(weights_path, warn=warn)
  use_ema = ema == 'yes' or (ema == 'auto' and loaded.ema_params is not None)
  if use_ema and loaded.ema_params is None:
    raise errors.UserError(f'--ema=yes but {loaded.source} has no EMA '
                           'parameters; use --ema=auto or --ema=no.')
  params = loaded.ema_params if use_ema else loaded.params
  model = eval_model(config)
  size = config.data.image_size
  expected_params, expected_state = jax.eval_shape(
      lambda rng: model.init(rng, jnp.zeros((1, size, size, 3)), True),
      jax.random.key(0))
  params = weights_lib.in_model_layout(params, config.model, expected_params)
  weights_lib.check_fits(loaded, config.model, expected_params, params)
  weights_lib.check_fits(loaded, config.model, expected_state,
                         loaded.bn_state, 'bn_state')
  what = 'EMA parameters' if use_ema else 'parameters'
  return params, loaded.bn_state, f'{what} of {loaded.source}'


class Classifier:
  """Softmax probabilities of config's model on uint8 images, jitted for
  one batch size (shorter batches are padded)."""

  def __init__(self, config, params, bn_state, batch_size: int):
    model = eval_model(config)
    mean, std = data.normalization(config.data)
    compute_dtype = experiment.COMPUTE_DTYPES[config.compute_dtype]
    precision = config.get('matmul_precision', 'highest')

    def probabilities(params, bn_state, images):
      with jax.default_matmul_precision(precision):
        # As experiment.Experiment normalizes: float32, then compute dtype.
        normalized = ((images.astype(jnp.float32)
                       - jnp.asarray(mean, jnp.float32))
                      / jnp.asarray(std, jnp.float32)).astype(compute_dtype)
        logits, _ = model.apply(params, bn_state, None, normalized,
                                is_training=False)
      return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    self._probabilities = jax.jit(probabilities)
    self._params = jax.device_put(params)
    self._bn_state = jax.device_put(bn_state)
    self.batch_size = batch_size

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """images: uint8 [N, S, S, 3], N <= batch_size -> float32 [N, classes]."""
    count = len(images)
    padded = np.zeros((self.batch_size, *images.shape[1:]), np.uint8)
    padded[:count] = images
    return np.asarray(self._probabilities(self._params, self._bn_state,
                                          padded))[:count]


def read_image(path: str, data_config) -> tuple[np.ndarray | None, str]:
  """(uint8 [S, S, 3] after the eval preprocessing, '') or (None, why)."""
  try:
    with open(path, 'rb') as f:
      encoded = f.read()
  except OSError as e:
    return None, f'cannot be read ({e.strerror or e})'
  image = data.preprocess_eval({'image': encoded}, data_config)
  if image is None:
    return None, 'not a readable JPEG or PNG image'
  return image, ''


def classify(classifier: Classifier, data_config, paths: Sequence[str],
             top_k: int, names: Sequence[str]) -> Iterator[dict]:
  """Per path, in order: {'path', 'top_k': [{'class', 'name',
  'probability'}]} (highest first), or {'path', 'error'}."""
  for start in range(0, len(paths), classifier.batch_size):
    chunk = paths[start:start + classifier.batch_size]
    decoded = [read_image(path, data_config) for path in chunk]
    images = [image for image, _ in decoded if image is not None]
    probabilities = iter(classifier(np.stack(images)) if images else [])
    for path, (image, why) in zip(chunk, decoded):
      if image is None:
        yield {'path': path, 'error': why}
        continue
      row = next(probabilities)
      best = np.argsort(-row, kind='stable')[:top_k]
      yield {'path': path, 'top_k': [
          {'class': int(index), 'name': names[index],
           'probability': float(row[index])} for index in best]}


def class_names(config, workdir: str | None, warn=_warn) -> list[str]:
  """Names of the config's classes: the workdir's class_names.json, else
  data.class_names(config.data), else the indices as strings."""
  count = config.model.num_classes
  candidates = []
  if workdir:
    candidates.append((workdir_lib.read_class_names(workdir),
                       f'{workdir}/{workdir_lib.CLASS_NAMES_FILE}'))
  try:
    candidates.append((data.class_names(config.data),
                       f'the dataset {config.data.name}'))
  except (ValueError, OSError):  # e.g. the image folder is not here
    pass
  for names, origin in candidates:
    if names is None:
      continue
    if len(names) == count:
      return [str(name) for name in names]
    warn(f'Ignoring the {len(names)} class names of {origin}: the model has '
         f'{count} classes.')
  return [str(index) for index in range(count)]


def format_line(result: dict) -> str:
  """'path: name 0.873, name 0.051' or 'path: error: why (skipped)'."""
  if 'error' in result:
    return f'{result["path"]}: error: {result["error"]} (skipped)'
  return f'{result["path"]}: ' + ', '.join(
      f'{entry["name"]} {entry["probability"]:.3f}'
      for entry in result['top_k'])


def run(config, workdir: str | None, weights_path: str | None,
        paths: Sequence[str], top_k: int = 5, batch_size: int = 32,
        ema: str = 'auto', as_json: bool = False, out=sys.stdout,
        warn=_warn) -> list[dict]:
  """The whole command: checks the arguments, loads, classifies, prints to
  out; returns the results. UserError when nothing could be classified."""
  if bool(workdir) == bool(weights_path):
    raise errors.UserError('Give exactly one of --workdir (a training run) '
                           'and --weights (a *.safetensors weights file).')
  if not paths:
    raise errors.UserError('Give the images to classify: image files or '
                           'folders after the flags.')
  if top_k < 1:
    raise errors.UserError(f'--top_k={top_k}; it must be >= 1.')
  if batch_size < 1:
    raise errors.UserError(f'--batch_size={batch_size}; it must be >= 1.')
  if config.compute_dtype not in experiment.COMPUTE_DTYPES:
    raise errors.UserError(
        f'Unknown compute_dtype {config.compute_dtype!r}; allowed: '
        f'{tuple(experiment.COMPUTE_DTYPES)}.')
  try:
    models.validate_config(config.model)
    # data's private helper is the one place that says which size eval
    # uses (data.eval_image_size, 0 = data.image_size).
    eval_size = data._split_image_size(config.data, 'eval')  # pylint: disable=protected-access
    models.check_image_size(config.model, eval_size)
    data.normalization(config.data)  # an unknown dataset name
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  images = collect_images(paths)
  params, bn_state, description = load_parameters(
      config, workdir or weights_path, ema, warn)
  names = class_names(config, workdir, warn)
  warn(f'Classifying {len(images)} image(s) with the {description}.')
  classifier = Classifier(config, params, bn_state, batch_size)
  results = []
  for result in classify(classifier, config.data, images,
                         min(top_k, len(names)), names):
    results.append(result)
    if not as_json:
      print(format_line(result), file=out, flush=True)
  if as_json:
    json.dump(results, out, indent=1)
    out.write('\n')
  if all('error' in result for result in results):
    raise errors.UserError(f'None of the {len(results)} image(s) could be '
                           'read as JPEG or PNG.')
  return results


def _define_flags():
  """The command's flags (defined only when run as a script, so importing
  this module defines no absl flags)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file of the model.')
  flags.DEFINE_string('workdir', None, 'A training run: its newest intact '
                      'checkpoint and class_names.json.')
  flags.DEFINE_string('weights', None, 'A weights file (*.safetensors).')
  flags.DEFINE_integer('top_k', 5, 'Classes per image.')
  flags.DEFINE_bool('json', False, 'One JSON document on stdout.')
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')
  flags.DEFINE_enum('ema', 'auto', EMA_CHOICES,
                    'EMA parameters: when present, always, never.')


def main(argv):
  values = flags.FLAGS
  if not values['verbosity'].present:
    # Each unreadable image is reported on its own line: not again as the
    # pipeline's warning about skipping it.
    logging.set_verbosity(logging.ERROR)
  run(values.config, values.workdir, values.weights, argv[1:],
      top_k=values.top_k, batch_size=values.batch_size, ema=values.ema,
      as_json=values.json)


if __name__ == '__main__':
  _define_flags()
  cli.run(main, required=['config'])
