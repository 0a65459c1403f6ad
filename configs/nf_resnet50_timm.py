"""timm's nf_resnet50 as an nfnets config: the ImageNet recipe
(configs/base.py) with the model options that reproduce timm's network
exactly (nfnets.timm_weights.TIMM_OPTIONS) and the evaluation resolution and
crop of timm's ImageNet weights nf_resnet50.ra2_in1k (docs/pretrained.md).

  python -m tools.convert_timm --timm_weights=model.safetensors \\
      --model=nf_resnet50 --out=weights/nf_resnet50_timm.safetensors
  python eval.py --config=configs/nf_resnet50_timm.py \\
      --weights=weights/nf_resnet50_timm.safetensors
"""

import ml_collections

from configs import base
from nfnets import timm_weights

# timm's pretrained cfg per model: (input_size, test_input_size, crop_pct).
# nf_resnet50.ra2_in1k trained at 256 px and is evaluated at 288 px on the
# central 94%; timm has no weights for nf_resnet26 / 101 and gives them its
# defaults, 224 px and 90%.
TIMM_RESOLUTIONS = {'nf_resnet26': (224, 224, 0.9),
                    'nf_resnet50': (256, 288, 0.94),
                    'nf_resnet101': (224, 224, 0.9)}


def timm_imagenet(timm_name: str):
  """The ImageNet config of timm's `timm_name` (a key of
  timm_weights.TIMM_MODELS): the recipe's optimizer and regularization, the
  timm model options, timm's train and eval resolution and crop.
  data.num_classes and model.num_classes are one value (fine-tuning on
  other data: set either)."""
  variant = timm_weights.TIMM_MODELS[timm_name]
  config = base.get_base_config()
  config.model = timm_weights.config_for(
      timm_name, **base.NF_REGULARIZATION.get(variant, {}))
  num_classes = ml_collections.FieldReference(config.data.num_classes)
  config.model.num_classes = num_classes
  config.data.num_classes = num_classes
  train_size, eval_size, crop = TIMM_RESOLUTIONS[timm_name]
  config.data.image_size = train_size
  config.data.eval_image_size = eval_size
  config.data.eval_crop_fraction = crop
  return config


def get_config():
  return timm_imagenet('nf_resnet50')
