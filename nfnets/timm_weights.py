"""timm's NF-ResNet weights (nf_resnet26 / 50 / 101) as nfnets parameters.

timm's NF-ResNets are the paper's pre-activation bottleneck NF-ResNets (same
widths, depths, alpha = 0.2 and beta bookkeeping) with four differences,
each a model option here (`TIMM_OPTIONS`, set by `config_for`):
  * Scaled WS as (W - mean) / sqrt(Var(W) + 1e-5) * gain * gamma /
    sqrt(fan_in): eps added to the variance, and the activation's gamma
    (the authors' sampled relu constant 1.7139588594436646, not our closed
    form 1.71286) folded into every conv, the stem's included, with plain
    activations (model.ws_form='timm', ws_eps=1e-5, activation_gamma);
  * PyTorch's symmetric padding, in the 3x3/2 max-pool too (padding);
  * a stride-2 block's shortcut is a 2x2 average pool then a 1x1 conv
    (strided_shortcut='avg_pool_conv');
  * no skip gain: ours is set to 1 (skip_gain_init=1.0).
The final activation before pooling and the classifier are the same.

  state_dict = load_safetensors('model.safetensors')  # timm's hub file
  model_config = config_for('nf_resnet50')  # or config_from_state_dict(...)
  params = convert(state_dict, model_config)  # for resnet.build(model_config)

Parameter names: timm `stem.conv`, `stages.S.B.{downsample.conv, conv1,
conv2, conv3}` and `head.fc` are our `resnet/stem_conv`, `resnet/block<i>/
{shortcut, conv0, conv1, conv2}` (i counts blocks over all stages) and
`resnet/classifier`; timm's kernels are OIHW (ours HWIO), its gains [O, 1,
1, 1] (ours [O]), its classifier weight [classes, features] (ours the
transpose). timm's NF-RegNets, NFNets and NF-ResNets with attention are
other architectures and are refused with the reason.
"""

import jax
import ml_collections
import numpy as np

from nfnets import errors
from nfnets import resnet
from nfnets import stacking
from nfnets import weights

# timm model name -> our variant (resnet.VARIANTS).
TIMM_MODELS = {'nf_resnet26': 'ResNet26', 'nf_resnet50': 'ResNet50',
               'nf_resnet101': 'ResNet101'}
# timm's _nonlin_gamma['relu'], the authors' sampled value.
TIMM_RELU_GAMMA = 1.7139588594436646
# The model options that make nfnets.resnet compute what timm's NormFreeNet
# computes (module docstring). beta_placement: timm multiplies act(x) by
# 1 / beta, the same for relu, and the same rounding in this order.
TIMM_OPTIONS = dict(
    name='nf_resnet', activation='relu', alpha=0.2, use_scaled_ws=True,
    ws_form='timm', ws_eps=1e-5, activation_gamma=TIMM_RELU_GAMMA,
    padding='symmetric', strided_shortcut='avg_pool_conv',
    beta_placement='after_activation', skip_gain_init=1.0, use_se=False,
    stem='imagenet')

# Our conv module name in a block -> timm's.
_BLOCK_CONVS = {'shortcut': 'downsample.conv', 'conv0': 'conv1',
                'conv1': 'conv2', 'conv2': 'conv3'}
_STEM_KEY = 'stem.conv.weight'
_CLASSIFIER_KEY = 'head.fc.weight'

# Keys that mark timm networks this module cannot import, with the reason.
_OTHER_ARCHITECTURES = (
    (('stem.conv1.', '.conv2b.'), 'an NFNet (timm nfnet_*, dm_nfnet_*, '
     'eca_nfnet_*: deep 4-conv stem, an extra 3x3 conv per block, grouped '
     'convs; the later NFNet paper), which this repository does not '
     'implement'),
    (('final_conv.', '.attn.'), "an NF-RegNet (timm nf_regnet_*), which "
     "differs from the authors' NF-RegNets that nfnets.regnet builds: timm "
     'rounds every channel count to a multiple of 8 (B0: stem 40, stages '
     "40-80-160-328, against the authors' 36, 36-78-156-330; squeeze-excite "
     'widths too), so its tensors do not fit'),
    (('.attn_last.',), 'an NF-ResNet with squeeze-excite or ECA attention '
     '(timm nf_seresnet*, nf_ecaresnet*), which nfnets.resnet does not '
     'build'),
)


def config_for(timm_name: str, **overrides) -> ml_collections.ConfigDict:
  """Our model config (resnet.make_config) for timm's `timm_name`
  (a key of TIMM_MODELS), with TIMM_OPTIONS; overrides on top (e.g.
  num_classes)."""
  if timm_name not in TIMM_MODELS:
    raise errors.UserError(f'Unknown timm model {timm_name!r}; allowed: '
                           f'{tuple(TIMM_MODELS)}.')
  config = resnet.make_config(variant=TIMM_MODELS[timm_name], **TIMM_OPTIONS)
  config.update(overrides)
  return config


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a timm .safetensors file (e.g. the hub's
  model.safetensors), name -> numpy array. UserError for a missing file, a
  pickle or torch.save file (never unpickled: it could run code), a
  truncated file, and an nfnets weights file (already converted)."""
  state_dict, metadata = weights.load_safetensors(path)
  if 'nfnets_format' in metadata:
    raise errors.UserError(
        f'{path} is already an nfnets weights file; use it directly '
        '(--weights) instead of converting it.')
  return state_dict


def _refuse_other_architectures(state_dict) -> None:
  """UserError naming the architecture if the keys are a timm network other
  than an NF-ResNet, or not timm's NF-ResNet layout at all."""
  for markers, description in _OTHER_ARCHITECTURES:
    for key in state_dict:
      if any(marker in key for marker in markers):
        raise errors.UserError(
            f'The state dict holds {description}; it cannot be imported '
            f'(tensor {key!r}). Only timm\'s {", ".join(TIMM_MODELS)} can.')
  if _STEM_KEY not in state_dict or _CLASSIFIER_KEY not in state_dict:
    sample = ', '.join(repr(k) for k in list(state_dict)[:3])
    raise errors.UserError(
        f'Not a timm NF-ResNet state dict: it has no {_STEM_KEY!r} or '
        f'{_CLASSIFIER_KEY!r} (its first keys: {sample or "none"}).')


def describe_state_dict(state_dict) -> dict:
  """What the tensors say about the network: {'depths': blocks per stage,
  'width': stem channels / 64, 'num_classes'}, read from the stem, the
  stage block indices and the classifier. UserError if they are not a timm
  NF-ResNet's."""
  _refuse_other_architectures(state_dict)
  depths = []
  for stage in range(len(resnet.STAGE_CHANNELS)):
    depth = 0
    while f'stages.{stage}.{depth}.conv1.weight' in state_dict:
      depth += 1
    depths.append(depth)
  if 0 in depths:
    raise errors.UserError(
        f'Not a 4-stage timm NF-ResNet: no tensor '
        f'stages.{depths.index(0)}.0.conv1.weight (blocks per stage found: '
        f'{depths}).')
  stem = state_dict[_STEM_KEY]
  classifier = state_dict[_CLASSIFIER_KEY]
  if np.ndim(stem) != 4 or np.ndim(classifier) != 2:
    raise errors.UserError(
        f'Not a timm NF-ResNet state dict: {_STEM_KEY!r} has shape '
        f'{np.shape(stem)} (want [O, 3, 7, 7]) and {_CLASSIFIER_KEY!r} '
        f'{np.shape(classifier)} (want [classes, features]).')
  return dict(depths=tuple(depths),
              width=stem.shape[0] / resnet.STEM_CHANNELS,
              num_classes=int(classifier.shape[0]))


def config_from_state_dict(state_dict) -> ml_collections.ConfigDict:
  """The model config (TIMM_OPTIONS) of the network the tensors describe:
  depths, width and classes from describe_state_dict (a timm variant's
  name when the depths are one)."""
  found = describe_state_dict(state_dict)
  variant = {depths: name for name, depths in resnet.VARIANTS.items()}.get(
      found['depths'])
  shape = dict(variant=variant) if variant else dict(depths=found['depths'])
  return resnet.make_config(**TIMM_OPTIONS, **shape, width=found['width'],
                            num_classes=found['num_classes'])


def _describe_config(config) -> str:
  depths = '-'.join(str(d) for d in resnet.stage_depths(config))
  return (f'the model (depths {depths}, width {config.width:g}, '
          f'{config.num_classes} classes)')


def _describe_found(state_dict) -> str:
  try:
    found = describe_state_dict(state_dict)
  except errors.UserError:
    return ''
  depths = '-'.join(str(d) for d in found['depths'])
  names = [name for name, variant in TIMM_MODELS.items()
           if resnet.VARIANTS[variant] == found['depths']]
  return (f' (the state dict holds depths {depths}'
          f'{" = " + names[0] if names else ""}, width {found["width"]:g}, '
          f'{found["num_classes"]} classes)')


def _timm_name(module: str, plan) -> str:
  """timm's module name for our unrolled Haiku module name."""
  parts = module.split('/')[1:]  # drop 'resnet'
  if parts == ['stem_conv']:
    return 'stem.conv'
  if parts == ['classifier']:
    return 'head.fc'
  spec = plan[int(parts[0][len('block'):])]
  first = next(s.index for s in plan if s.stage == spec.stage)
  return (f'stages.{spec.stage}.{spec.index - first}.'
          f'{_BLOCK_CONVS[parts[1]]}')


def _from_timm(name: str, shape: tuple, tensor: np.ndarray) -> np.ndarray:
  """timm's tensor in our layout: OIHW kernels -> HWIO, [O, 1, 1, 1] gains
  -> [O], the [classes, features] classifier weight transposed."""
  if name == 'w' and len(shape) == 4:
    return np.transpose(tensor, (2, 3, 1, 0))
  if name == 'w':
    return tensor.T
  return tensor.reshape(shape)


def _timm_shape(name: str, shape: tuple) -> tuple:
  if name == 'w' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if name == 'w':
    return shape[::-1]
  if name == 'gain':
    return (shape[0], 1, 1, 1)
  return shape


_TIMM_PARAM = {'w': 'weight', 'b': 'bias', 'bias': 'bias', 'gain': 'gain'}


def _model_order(module_and_name: tuple[str, str]) -> tuple:
  """Sort key: stem, blocks in order (shortcut, conv0-2), classifier; in
  each module the kernel, gain, bias (timm's order, for messages)."""
  module, name = module_and_name
  parts = module.split('/')[1:]
  if parts[0] == 'stem_conv':
    rank = (0,)
  elif parts[0] == 'classifier':
    rank = (2,)
  else:
    rank = (1, int(parts[0][len('block'):]),
            list(_BLOCK_CONVS).index(parts[1]) if len(parts) > 1 else -1)
  return rank, ('w', 'gain', 'bias', 'b', 'skip_gain').index(name)


def convert(state_dict: dict[str, np.ndarray],
            model_config) -> dict[str, dict[str, np.ndarray]]:
  """Haiku params of resnet.build(model_config) holding timm's tensors.

  Args:
    state_dict: a timm NF-ResNet's tensors by name (load_safetensors),
      numpy arrays.
    model_config: our model config with TIMM_OPTIONS (config_for,
      config_from_state_dict); its block_loop decides the parameter layout
      (scanned blocks stacked).

  Returns:
    {module: {name: float32 array}}, every parameter of the model: timm's
    tensors converted, the skip gains 1 (timm has none).

  Raises:
    UserError (one line) for a timm network other than an NF-ResNet, a
    model config without the timm options, the first tensor missing or of
    another shape than the model needs (expected vs found), or tensors the
    model does not use.
  """
  differing = {k: model_config.get(k) for k, v in TIMM_OPTIONS.items()
               if model_config.get(k) != v and k != 'skip_gain_init'}
  if differing:
    raise errors.UserError(
        f'The model config differs from timm\'s NF-ResNet in {differing}; '
        'use timm_weights.config_for(...) (configs/nf_resnet50_timm.py).')
  _refuse_other_architectures(state_dict)
  unrolled = ml_collections.ConfigDict(model_config.to_dict())
  unrolled.block_loop = 'unrolled'
  plan = resnet.block_plan(unrolled)
  size = resnet.total_stride(unrolled)
  model = resnet.build(unrolled)
  shapes, _ = jax.eval_shape(
      lambda rng, images: model.init(rng, images, False), jax.random.key(0),
      jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
  params, used = {}, set()
  for module, name in sorted(((m, n) for m, entries in shapes.items()
                              for n in entries), key=_model_order):
    spec = shapes[module][name]
    if name == 'skip_gain':
      params.setdefault(module, {})[name] = np.ones(spec.shape, np.float32)
      continue
    key = f'{_timm_name(module, plan)}.{_TIMM_PARAM[name]}'
    want = _timm_shape(name, tuple(spec.shape))
    if key not in state_dict:
      raise errors.UserError(
          f'The state dict has no tensor {key!r} {want}, which '
          f'{_describe_config(model_config)} needs'
          f'{_describe_found(state_dict)}.')
    tensor = np.asarray(state_dict[key])
    if tuple(tensor.shape) != want:
      raise errors.UserError(
          f'Tensor {key!r} has shape {tuple(tensor.shape)}; '
          f'{_describe_config(model_config)} expects {want}'
          f'{_describe_found(state_dict)}.')
    params.setdefault(module, {})[name] = np.ascontiguousarray(
        _from_timm(name, tuple(spec.shape), tensor), dtype=np.float32)
    used.add(key)
  unused = [key for key in state_dict if key not in used]
  if unused:
    raise errors.UserError(
        f'{len(unused)} tensor(s) of the state dict are not used by '
        f'{_describe_config(model_config)}, first {unused[0]!r}'
        f'{_describe_found(state_dict)}.')
  if resnet.uses_scan(model_config):
    params = stacking.convert_layout(params, resnet.block_plan(model_config),
                                     scanned=True)
  return params

