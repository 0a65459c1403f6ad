"""Writes tests/fixtures/timm_nf_resnet/: a narrow timm NF-ResNet with
random parameters and its logits, for tests/test_timm_weights.py.

Runs in the peer environment (torch + timm, never the project's own):

  bash benchmarks/setup_peers.sh        # once: creates .venv-peers
  .venv-peers/bin/python -m tools.make_timm_fixture

The network is timm's own nf_resnet26 config (NfCfg: 7x7 stem with
max-pool, ResNet-D avg-pool shortcuts, gamma folded into ScaledStdConv2d,
PyTorch padding) at 1/16 of its channels, with ch_div=1 so channel counts
are not rounded up to multiples of 8 (4-channel stem, stages 16-32-64-128),
a third block in stage 3 (depths 2-2-3-2: two identical blocks in a row,
which model.block_loop='scan' stores stacked) and 10 classes. Every weight, gain and bias is drawn at random (timm
initializes conv3 gains and biases to zero, which would hide a wrong
mapping); each conv kernel has a small spread (std 0.002-0.03), so timm's
epsilon (added to Var(W)) changes the kernel by 0.1-40% and a wrong Scaled
WS form cannot match. The images are 72 x 56 px, so the feature maps reach
odd sizes (9 x 7 -> 5 x 4 -> 3 x 2), where SAME and symmetric padding and
the avg-pool's ceil mode differ. Deterministic: the same files each run.
"""

import argparse
import dataclasses
import os

import numpy as np
import torch
from safetensors import torch as safetensors_torch

from benchmarks import peers_timm

OUT_DIR = os.path.join('tests', 'fixtures', 'timm_nf_resnet')
WIDTH_DIVISOR = 16
DEPTHS = (2, 2, 3, 2)
NUM_CLASSES = 10
IMAGES_SHAPE = (4, 3, 72, 56)  # N, C, H, W as timm takes them
SEED = 0

README = """# timm NF-ResNet fixture

Made by `.venv-peers/bin/python -m tools.make_timm_fixture` (see that file)
with timm {timm_version} and torch {torch_version} on CPU.

- `model.safetensors`: `state_dict()` of timm's `NormFreeNet` built from
  timm's `nf_resnet26` config with channels divided by {divisor} and
  `ch_div=1` (stem 4, stages 16-32-64-128 channels, bottlenecks 4-8-16-32)
  and depths {depths}, {num_classes} classes, every weight, gain and bias random
  (seed {seed}); the same layout as timm's hub `model.safetensors` files.
- `expected.safetensors`: `images` float32 {images_shape} (NCHW, standard
  normal) and `logits` float32 [{batch}, {num_classes}], timm's output in eval
  mode (`torch.inference_mode()`).

tests/test_timm_weights.py converts the first with nfnets.timm_weights and
checks our model's logits against the second.
"""


def randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
  """Every parameter redrawn: conv kernels with a per-output-channel std
  between 0.002 and 0.03 (so timm's eps = 1e-5 on Var(W) matters), gains
  uniform in [0.5, 1.5], biases N(0, 0.2^2), the classifier N(0, 0.5^2)."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith('.gain'):
        param.copy_(0.5 + torch.rand(param.shape, generator=generator))
      elif name.endswith('.bias'):
        param.copy_(0.2 * torch.randn(param.shape, generator=generator))
      elif name.startswith('head.fc.'):
        param.copy_(0.5 * torch.randn(param.shape, generator=generator))
      else:  # conv kernel [O, I, kh, kw]
        log_std = torch.empty(param.shape[0], 1, 1, 1).uniform_(
            np.log(0.002), np.log(0.03), generator=generator)
        param.copy_(torch.exp(log_std)
                    * torch.randn(param.shape, generator=generator))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out_dir', default=OUT_DIR)
  args = parser.parse_args()
  timm, _ = peers_timm.import_timm()
  from timm.models import nfnet  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  base = nfnet.model_cfgs['nf_resnet26']
  cfg = dataclasses.replace(
      base, channels=tuple(c // WIDTH_DIVISOR for c in base.channels),
      stem_chs=base.stem_chs // WIDTH_DIVISOR, ch_div=1, depths=DEPTHS)
  model = nfnet.NormFreeNet(cfg, num_classes=NUM_CLASSES).eval()
  generator = torch.Generator().manual_seed(SEED)
  randomize_(model, generator)
  images = torch.randn(IMAGES_SHAPE, generator=generator)
  with torch.inference_mode():
    logits = model(images)
  os.makedirs(args.out_dir, exist_ok=True)
  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  safetensors_torch.save_file(state, os.path.join(args.out_dir,
                                                  'model.safetensors'),
                              metadata={'format': 'pt'})
  safetensors_torch.save_file(
      {'images': images.contiguous(), 'logits': logits.contiguous()},
      os.path.join(args.out_dir, 'expected.safetensors'))
  with open(os.path.join(args.out_dir, 'README.md'), 'w') as f:
    f.write(README.format(
        timm_version=timm.__version__, torch_version=torch.__version__,
        divisor=WIDTH_DIVISOR, depths='-'.join(map(str, DEPTHS)),
        num_classes=NUM_CLASSES, seed=SEED,
        images_shape=list(IMAGES_SHAPE), batch=IMAGES_SHAPE[0]))
  count = sum(v.numel() for v in state.values())
  print(f'wrote {args.out_dir}: {len(state)} tensors, {count:,} parameters; '
        f'logits std {logits.std().item():.3f}, '
        f'max |logit| {logits.abs().max().item():.3f}')


if __name__ == '__main__':
  main()
