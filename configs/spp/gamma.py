"""Gamma study: NF-ResNet-600 with Scaled WS, per nonlinearity and gamma.

Scaled WS keeps a conv's output variance equal to its input's, so a
residual branch (three activation -> conv steps) preserves variance only if
every activation maps a unit Gaussian to unit variance: gamma * g(z) with
gamma = 1 / std(g(z)) (nfnets.activations.gamma). For silu, gelu and tanh
each network uses its own computed gamma, gamma = 1 (the bare
nonlinearity), or relu's gamma sqrt(2 / (1 - 1/pi)) = 1.713; ReLU with its
gamma is the reference. Labels: <activation>_<computed|one|relu>.

N(0, 1) input at 128 px, batch 8 (8 x 32 x 32 = 8192 samples per channel in
stage 1, 128 in stage 4): ten ResNet-600s at 512 px would take about
20 minutes on 2 CPU cores, at 128 px about 5. Stages 1-2 (32 x 32 and
16 x 16) carry the comparison; in stages 3-4 (8 x 8, 4 x 4) SAME zero
padding lowers every branch's variance for any gamma (see
docs/signal_propagation.md). Log y axes: wrong gammas make the residual
variance vanish by orders of magnitude.
"""

import ml_collections

from nfnets import activations
from nfnets import resnet

ACTIVATIONS = ('silu', 'gelu', 'tanh')
GAMMAS = {
    'computed': None,                     # activations.gamma(name)
    'one': 1.0,
    'relu': activations.relu_gamma(),
}


def get_config():
  config = ml_collections.ConfigDict()
  config.title = 'NF-ResNet-600 (alpha = 1, Scaled WS) at init: gamma study'
  config.image_size = 128
  config.batch_size = 8
  config.seed = 0
  config.output_dir = 'runs/spp/gamma'
  config.log_scale = True
  nf = dict(name='nf_resnet', variant='ResNet600', alpha=1.0,
            skip_gain_init=1.0, use_scaled_ws=True)
  models = {'relu_computed': resnet.make_config(activation='relu', **nf)}
  for name in ACTIVATIONS:
    for label, gamma in GAMMAS.items():
      models[f'{name}_{label}'] = resnet.make_config(
          activation=name, activation_gamma=gamma, **nf)
  config.models = ml_collections.ConfigDict(models)
  return config
