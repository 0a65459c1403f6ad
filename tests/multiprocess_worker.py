"""Two train steps as one of several JAX processes; writes the parameters.

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process feeds its own slice of the same global batches (process p gets
rows [p * B / P, (p + 1) * B / P)).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top


def main():
  from nfnets.cpu import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure_process()  # as train.py does, before the backend
  process_id, num_processes, port, out = sys.argv[1:5]
  process_id, num_processes = int(process_id), int(num_processes)
  if num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                               num_processes=num_processes,
                               process_id=process_id)
  import experiment  # pylint: disable=g-import-not-at-top
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from nfnets import data  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config()
  config.model.name = 'bn_resnet'  # exercises cross-process BatchNorm too
  config.train.update(dict(batch_size=32, steps=10))
  source = data.get_source(config.data, 'train')
  exp = experiment.Experiment(config)
  state = exp.init_state()
  local = 32 // num_processes
  for step in range(2):
    rows = slice(step * 32 + process_id * local,
                 step * 32 + (process_id + 1) * local)
    state, metrics = exp.train_step(state, {
        'images': source.records.images[rows],
        'labels': source.records.labels[rows]})
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)),
                        state['params'])
  flat = {jax.tree_util.keystr(path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  if process_id == 0:
    np.savez(out, loss=float(metrics['loss']),
             devices=jax.device_count(), **flat)
  print(f'process {process_id}: {jax.device_count()} devices, '
        f'{jax.local_device_count()} local, loss {float(metrics["loss"]):.6f}')


if __name__ == '__main__':
  main()
