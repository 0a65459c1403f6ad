"""timm's NF-ResNet-50 as a timing server, run in .venv-peers (never in the
project's environment: torch is not a project dependency).

benchmarks/peers.py starts this module once and drives it over stdin/stdout,
one request per line, so that its runs and the project's alternate in one
sitting:

  ready <json: versions, threads, parameter count>    (sent once at start)
  train <image_size> <steps>    -> ok <seconds for all steps>
  forward <image_size> <steps>  -> ok <seconds for all steps>
  quit                          -> (exits)
A request that fails answers `error <message>` and the server keeps going.

train = forward + backward + SGD step (Nesterov momentum 0.9, weight decay
1e-4 on weights only, label smoothing 0.1, the model's dropout and drop-path
on), the same recipe as configs/nf_resnet50.py; forward = eval mode under
torch.inference_mode(). float32, NCHW, random inputs made once per size.

  .venv-peers/bin/python -m benchmarks.peers_timm --check
builds the model and runs one forward on a 1x3x64x64 input (the setup
check of benchmarks/setup_peers.sh).
"""

import argparse
import glob
import importlib.util
import json
import os
import sys
import time

import torch

# Kept alive for the life of the process: the op schemas it declares.
_TORCHVISION_SCHEMAS = []


def _declare_torchvision_ops_if_unloadable() -> bool:
  """Lets CPU torch import a CUDA build of torchvision.

  PyPI's torchvision wheel is built against CUDA torch; beside CPU torch its
  C extension (_C.so) cannot load (it links libtorch_cuda.so). torchvision
  then still registers fake kernels for torchvision::nms and ::qnms
  unconditionally, which raises "operator torchvision::nms does not exist"
  and aborts `import torchvision` (and so `import timm`). Declaring those two
  schemas first lets the pure-Python part import; no timm ResNet uses a
  torchvision op. Returns True if the schemas had to be declared.
  """
  spec = importlib.util.find_spec('torchvision')
  if spec is None or not spec.submodule_search_locations:
    return False  # no torchvision: importing timm will say so
  libraries = glob.glob(os.path.join(spec.submodule_search_locations[0],
                                     '_C*.so'))
  if libraries:
    try:
      torch.ops.load_library(libraries[0])
      return False  # a matching build: nothing to do
    except OSError:
      pass
  schemas = torch.library.Library('torchvision', 'DEF')
  for op in ('nms', 'qnms'):
    schemas.define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) '
                   '-> Tensor')
  _TORCHVISION_SCHEMAS.append(schemas)
  return True


def import_timm():
  """(timm module, whether torchvision's C ops were unavailable)."""
  declared = _declare_torchvision_ops_if_unloadable()
  import timm  # pylint: disable=g-import-not-at-top
  return timm, declared


class Peer:
  """One timm model, its optimizer and fixed random batches per size."""

  def __init__(self, model_name: str, batch: int, threads: int,
               dropout_rate: float, drop_path_rate: float):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    timm, self.torchvision_ops_declared = import_timm()
    self.versions = dict(torch=torch.__version__, timm=timm.__version__)
    self.model = timm.create_model(model_name, drop_rate=dropout_rate,
                                   drop_path_rate=drop_path_rate)
    decay = [p for p in self.model.parameters() if p.ndim > 1]
    no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
    self.optimizer = torch.optim.SGD(
        [dict(params=decay, weight_decay=1e-4),
         dict(params=no_decay, weight_decay=0.0)],
        lr=0.1, momentum=0.9, nesterov=True)
    self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    self.batch = batch
    self.num_classes = self.model.num_classes
    self._inputs = {}

  def describe(self) -> dict:
    return dict(self.versions, threads=torch.get_num_threads(),
                parameters=sum(p.numel() for p in self.model.parameters()),
                torchvision_ops_declared=self.torchvision_ops_declared)

  def _batch(self, size: int):
    if size not in self._inputs:
      generator = torch.Generator().manual_seed(size)
      self._inputs[size] = (
          torch.randn(self.batch, 3, size, size, generator=generator),
          torch.randint(0, self.num_classes, (self.batch,),
                        generator=generator))
    return self._inputs[size]

  def train(self, size: int, steps: int) -> float:
    """Seconds for `steps` train steps on a [batch, 3, size, size] batch."""
    images, labels = self._batch(size)
    self.model.train()
    start = time.perf_counter()
    for _ in range(steps):
      self.optimizer.zero_grad(set_to_none=True)
      self.loss(self.model(images), labels).backward()
      self.optimizer.step()
    return time.perf_counter() - start

  def forward(self, size: int, steps: int) -> float:
    """Seconds for `steps` eval-mode forward passes."""
    images, _ = self._batch(size)
    self.model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
      for _ in range(steps):
        self.model(images)
    return time.perf_counter() - start


def _answer(line: str, peer: Peer) -> str:
  parts = line.split()
  if len(parts) != 3 or parts[0] not in ('train', 'forward'):
    return (f'error unknown request {line!r}; expected "train|forward '
            '<image_size> <steps>" or "quit"')
  mode, size, steps = parts[0], int(parts[1]), int(parts[2])
  if size < 32 or steps < 1:
    return f'error image_size {size} (>= 32) or steps {steps} (>= 1) invalid'
  return f'ok {getattr(peer, mode)(size, steps):.6f}'


def serve(peer: Peer) -> None:
  print('ready ' + json.dumps(peer.describe()), flush=True)
  for line in sys.stdin:
    line = line.strip()
    if line == 'quit':
      return
    try:
      answer = _answer(line, peer)
    except Exception as e:  # pylint: disable=broad-except
      answer = f'error {type(e).__name__}: {e}'.replace('\n', ' ')
    print(answer, flush=True)


def check(model_name: str) -> None:
  """Builds the model and runs one forward on a 1x3x64x64 input."""
  timm, declared = import_timm()
  model = timm.create_model(model_name).eval()
  with torch.inference_mode():
    logits = model(torch.randn(1, 3, 64, 64))
  if tuple(logits.shape) != (1, model.num_classes) or not bool(
      torch.isfinite(logits).all()):
    raise SystemExit(f'{model_name}: bad output {tuple(logits.shape)}')
  print(f'ok: timm {timm.__version__} {model_name} on torch '
        f'{torch.__version__} ({torch.get_num_threads()} threads): 1x3x64x64 '
        f'-> {tuple(logits.shape)}, '
        f'{sum(p.numel() for p in model.parameters()):,} parameters'
        + ('; torchvision C ops unavailable (CUDA build beside CPU torch), '
           'nms/qnms schemas declared' if declared else ''))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='nf_resnet50')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--threads', type=int,
                      default=len(os.sched_getaffinity(0)))
  parser.add_argument('--dropout_rate', type=float, default=0.0)
  parser.add_argument('--drop_path_rate', type=float, default=0.0)
  parser.add_argument('--check', action='store_true',
                      help='build the model, run one 64 px forward, exit')
  args = parser.parse_args()
  if args.check:
    check(args.model)
    return
  if args.batch < 1 or args.threads < 1:
    parser.error(f'--batch {args.batch} and --threads {args.threads} must be '
                 '>= 1')
  serve(Peer(args.model, args.batch, args.threads, args.dropout_rate,
             args.drop_path_rate))


if __name__ == '__main__':
  main()
