"""Signal Propagation Plots of any models of the codebase at initialization.

  python spp.py --config=configs/spp/quick.py
  python spp.py --config=configs/spp/fig2.py --config.output_dir=/tmp/fig2 \
      --config.models.nf_scaled_ws.alpha=0.5

Writes <output_dir>/spp.png and spp.csv and prints a per-stage summary. The
whole preset (model names, options, image size) is checked before any model
runs.
"""

import resource
import time

from ml_collections import config_flags

from nfnets import cli
from nfnets import errors
from nfnets import spp

_CONFIG = config_flags.DEFINE_config_file('config', None, 'SPP preset file.')


def main(argv):
  del argv
  config = _CONFIG.value
  try:
    spp.check_preset(config)
  except ValueError as e:  # a bad preset or override: the user's to fix
    raise errors.UserError(str(e)) from None
  start = time.time()
  results = spp.run(dict(config.models.items()), config.image_size,
                    config.batch_size, config.seed, config.output_dir,
                    config.get('title', ''), config.get('log_scale', False))
  print(spp.summary_table(results))
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f'wrote {config.output_dir}/spp.png and spp.csv; '
        f'{time.time() - start:.0f} s, peak memory {peak_gib:.1f} GiB')


if __name__ == '__main__':
  cli.run(main, required=['config'])
