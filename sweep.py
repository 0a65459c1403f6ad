r"""Runs a grid of train.py config overrides and collects the results.

  python sweep.py --config=configs/quickstart.py --workdir=runs/batch_study \
      --sweep=model.name=nf_resnet,bn_resnet \
      --sweep=train.batch_size=4,8,16,32,64 --seeds=0,1 \
      --plot_x=train.batch_size --metric=top1

Every point (one value of every --sweep, times --seeds) is its own train.py
process with its own workdir under --workdir. The whole grid is parsed and
validated before anything runs. A rerun of the same command skips points
that finished or diverged and resumes interrupted ones from their
checkpoints. Writes results.csv (one row per point and seed), results.md
(mean ± std over seeds) and METRIC_vs_AXIS.png into --workdir.

--sweep syntax:
  FIELD=V1,V2,...   e.g. --sweep=model.alpha=0.1,0.2,0.5
                         --sweep='model.depths=(1,1,1,1),(3,4,6,3)'
  linked points (several fields per point), '|' between points, optional
  LABEL: per point and NAME:: per axis:
    --sweep='method::NF:model.name=nf_resnet|NF-He:model.name=nf_resnet,model.use_scaled_ws=false|BN:model.name=bn_resnet'
Values parse as train.py's --config.FIELD=VALUE flags do (the type of the
existing field); --set=FIELD=VALUE fixes a field for every point.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from nfnets import errors
from nfnets import sweep

_CONFIG = flags.DEFINE_string('config', None, 'Config file for train.py.')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Sweep folder: one subfolder per point.')
_SWEEP = flags.DEFINE_multi_string(
    'sweep', [], 'One axis: FIELD=V1,V2,... or linked points (see --help).')
_SET = flags.DEFINE_multi_string(
    'set', [], 'FIELD=VALUE fixed for every point (not an axis).')
_SEEDS = flags.DEFINE_string('seeds', '0', 'Comma-separated config.seed values.')
_PARALLEL = flags.DEFINE_integer('parallel', 1,
                                 'train.py processes running at once.')
_PLOT_X = flags.DEFINE_string(
    'plot_x', None, 'Axis on the plot x axis (default: the first swept axis '
    'with more than one value).')
_METRIC = flags.DEFINE_string(
    'metric', 'top1', 'Final eval metric for the plot and the pivot table '
    '(loss, top1, top5; ema_* when EMA is on).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False,
                             'Validate and list the points; run nothing.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # as train.py: no library INFO logs
  try:
    if not _SWEEP.value:
      raise ValueError('No --sweep given: name at least one axis, e.g. '
                       '--sweep=model.alpha=0.1,0.2.')
    axes = [sweep.parse_axis(spec) for spec in _SWEEP.value]
    fixed = [sweep.parse_assignment(text, f'--set={text}')
             for text in _SET.value]
    points = sweep.make_grid(axes, sweep.parse_seeds(_SEEDS.value), fixed)
    plot_x = _PLOT_X.value or sweep.default_plot_axis(axes)
    if plot_x:
      sweep.axis_by_name(axes, plot_x)
    configs = sweep.validate_grid(_CONFIG.value, points)
  except ValueError as e:
    print(f'sweep.py: {e}', file=sys.stderr)
    sys.exit(errors.USER_ERROR_EXIT_CODE)
  if _DRY_RUN.value:
    for point in points:
      print(f'{point.name}: {" ".join(point.args())}')
    print(f'{len(points)} points valid.')
    return
  def write_reports():
    return sweep.write_reports(_WORKDIR.value, axes, points, plot_x,
                               _METRIC.value)

  outcomes = sweep.run_points(_CONFIG.value, _WORKDIR.value, points, configs,
                              _PARALLEL.value, after_each=write_reports)
  paths = write_reports()
  print('Wrote ' + ', '.join(paths.values()))
  bad = [n for n, o in outcomes.items() if o.status in ('failed', 'crashed')]
  if bad:
    print(f'{len(bad)} points failed or crashed (see results.csv); rerun the '
          'same command to retry them.', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
