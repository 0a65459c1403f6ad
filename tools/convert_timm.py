"""Converts timm NF-ResNet weights into an nfnets weights file.

  python -m tools.convert_timm --timm_weights=model.safetensors \
      --model=nf_resnet50 --out=weights/nf_resnet50_timm.safetensors

--timm_weights: timm's model.safetensors (e.g. from
https://huggingface.co/timm/nf_resnet50.ra2_in1k); pickle / torch.save
files are refused, never unpickled. --model: which timm NF-ResNet it is; the
tensors must fit it (a classifier with another number of classes is taken
as it is). --out: a new .safetensors file (never overwritten) holding the
parameters and the full config of configs/nf_resnet<depth>_timm.py, for
eval.py --weights, predict.py and --config.init_from (docs/pretrained.md).
Bad input: one line on stderr, exit code 2, nothing written.
"""

import os
import sys

from absl import flags

if not __package__:  # run as `python tools/convert_timm.py`: the repo root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position

from configs import nf_resnet50_timm
from nfnets import cli
from nfnets import errors
from nfnets import timm_weights
from nfnets import weights
from nfnets import workdir

_TIMM_WEIGHTS = flags.DEFINE_string(
    'timm_weights', None, "timm's model.safetensors.")
_MODEL = flags.DEFINE_enum('model', None, list(timm_weights.TIMM_MODELS),
                           'The timm model the weights are of.')
_OUT = flags.DEFINE_string('out', None,
                           'The nfnets weights file to write (*.safetensors).')


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f'Unexpected arguments {argv[1:]}; pass '
                           '--timm_weights, --model and --out.')
  out = _OUT.value
  # Checked before reading the input (save_weights checks again).
  if os.path.exists(out):
    raise errors.UserError(f'{out} exists; choose another --out (weights '
                           'files are never overwritten).')
  if not out.endswith(weights.SUFFIX):
    raise errors.UserError(f'--out must end with {weights.SUFFIX}, got '
                           f'{out!r}.')
  state_dict = timm_weights.load_safetensors(_TIMM_WEIGHTS.value)
  num_classes = timm_weights.describe_state_dict(state_dict)['num_classes']
  config = nf_resnet50_timm.timm_imagenet(_MODEL.value)
  imagenet_classes = config.model.num_classes
  config.model.num_classes = num_classes  # data.num_classes too (linked)
  params = timm_weights.convert(state_dict, config.model)
  if num_classes != imagenet_classes:
    print(f'note: the classifier has {num_classes} classes, not '
          f'{imagenet_classes}; the stored config says {num_classes}.')
  weights.save_weights(out, params, {}, workdir.config_to_dict(config))
  count = sum(v.size for entries in params.values() for v in entries.values())
  print(f'wrote {out}: timm {_MODEL.value}, {count:,} parameters. Evaluate '
        f'with: python eval.py --config=configs/{_MODEL.value}_timm.py '
        f'--weights={out}')


if __name__ == '__main__':
  cli.run(main, required=['timm_weights', 'model', 'out'])
