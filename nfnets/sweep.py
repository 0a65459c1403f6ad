"""Ablation sweeps: a grid of config overrides, one train.py process per point.

A sweep is the cartesian product of its axes times the seeds. Each point runs
as its own `train.py --config=FILE --workdir=SWEEP/POINT --config.a.b=V ...`
subprocess, so resuming (train.py restarts from its latest checkpoint) and
isolation (a crash or divergence stays inside its process) come for free.

Axis syntax (one --sweep flag per axis):
  FIELD=V1,V2,...            one field, one value per point, e.g.
                             train.batch_size=4,8,16 or
                             model.depths=(1,1,1,1),(2,2,2,2)
  [NAME::][LABEL:]F=V[,F=V...]|[LABEL:]F=V...
                             linked points: each '|'-separated point sets
                             several fields together, e.g.
                             'method::NF:model.name=nf_resnet|'
                             'BN:model.name=bn_resnet,model.bn_order=relu_bn_conv'.
                             A spec whose second comma-separated item also
                             contains '=' is one linked point. Labels default
                             to the point's assignments, the axis name to its
                             fields joined by '+'.
Commas inside (), [] or quotes do not split. Values use the syntax of
ml_collections config_flags (the type of the existing field), exactly as
train.py parses them: the whole grid is parsed and validated before anything
runs.

Each point's folder holds train.py's files plus `stdout.log`, `stderr.log`
and `sweep_point.json` (outcome, reason, wall time, the resolved config). A
rerun skips points that finished or diverged with the same resolved config,
and reruns the others: its progress line says `resume ... (from step N)`
for a point with a checkpoint, `start` for one without.

The runner launches a point with `launch_point(command, workdir, env)`; a
later per-device-group runner only needs a different environment per slot
(`environments`, e.g. CUDA_VISIBLE_DEVICES), nothing else changes.
"""

import collections
import csv
import dataclasses
import hashlib
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Iterable, Sequence

from absl import flags
from ml_collections import config_flags

from nfnets import errors

STATUS_FILE = 'sweep_point.json'
# Outcomes that a rerun does not repeat: the same config gives the same result
# (training is deterministic). 'failed' (exit 2, e.g. a locked workdir),
# 'stopped' (SIGTERM / Ctrl-C: checkpoint written) and 'crashed' are retried.
FINAL_STATUSES = ('finished', 'diverged')
_STOPPED = 'Training stopped:'
_STEP_RE = re.compile(r'at step (\d+)')
_FIELD_RE = re.compile(r'^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$')
_SEED_FIELD = 'seed'
# Results columns besides the axes and the metrics.
_RUN_COLUMNS = ('seed', 'status', 'reason', 'diverged_step', 'wall_s')
_TRAILING_COLUMNS = ('overrides', 'code_version', 'workdir')
_TAIL_LINES = 3
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(_ROOT, 'train.py')


@dataclasses.dataclass(frozen=True)
class AxisValue:
  """One value of an axis: a label and the (field, raw value) it sets."""
  label: str
  assignments: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Axis:
  name: str
  values: tuple[AxisValue, ...]

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f for v in self.values for f, _ in v.assignments))


@dataclasses.dataclass(frozen=True)
class Point:
  """One run: a value of every axis and a seed."""
  labels: tuple[tuple[str, str], ...]     # (axis name, value label)
  seed: int
  overrides: tuple[tuple[str, str], ...]  # (field, raw value), seed last
  name: str                               # folder under the sweep workdir

  def args(self) -> list[str]:
    return [f'--config.{field}={value}' for field, value in self.overrides]

  def describe(self) -> str:
    return ' '.join(f'{a}={v}' for a, v in self.labels) + f' seed={self.seed}'


@dataclasses.dataclass
class Outcome:
  """What happened to one point. status: finished, diverged, failed, crashed."""
  status: str
  reason: str = ''
  diverged_step: int | None = None
  wall_s: float = 0.0
  returncode: int | None = None


# ---------------------------------------------------------------- parsing


def split_top_level(text: str, separator: str = ',') -> list[str]:
  """Splits at `separator` outside (), [], {} and quotes."""
  parts, depth, quote, current = [], 0, None, []
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in '\'"':
      quote = char
    elif char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
    elif char == separator and depth == 0:
      parts.append(''.join(current))
      current = []
      continue
    current.append(char)
  parts.append(''.join(current))
  return [p.strip() for p in parts]


def _check_field(field: str, spec: str) -> str:
  if not _FIELD_RE.match(field):
    raise ValueError(f'Sweep {spec!r}: {field!r} is not a config field name '
                     '(expected dotted names like model.alpha).')
  if field == _SEED_FIELD:
    raise ValueError(f'Sweep {spec!r}: set seeds with --seeds, not a sweep.')
  return field


def parse_assignment(text: str, spec: str) -> tuple[str, str]:
  """'FIELD=VALUE' -> (FIELD, VALUE); spec names the flag in errors."""
  field, sep, value = text.partition('=')
  if not sep or not value.strip():
    raise ValueError(f'Sweep {spec!r}: {text!r} is not FIELD=VALUE.')
  return _check_field(field.strip(), spec), value.strip()


def parse_axis(spec: str) -> Axis:
  """One --sweep flag (syntax in the module docstring) -> Axis."""
  spec = spec.strip()
  if not spec:
    raise ValueError('Empty --sweep: give FIELD=V1,V2,... .')
  name, sep, rest = spec.partition('::')
  if not sep:
    name, rest = '', spec
  items = split_top_level(rest)
  linked = '|' in rest or name or any('=' in item for item in items[1:])
  if not linked:
    field, values = parse_assignment(items[0], spec)[0], items
    values[0] = items[0].partition('=')[2].strip()
    if any(not v for v in values):
      raise ValueError(f'Sweep {spec!r}: {field} has an empty value.')
    axis = Axis(field, tuple(AxisValue(v, ((field, v),)) for v in values))
  else:
    points = []
    for text in split_top_level(rest, '|'):
      label, colon, body = text.partition(':')
      if not colon or '=' in label:
        label, body = '', text
      if not body.strip():
        raise ValueError(f'Sweep {spec!r}: empty point in a linked sweep.')
      assignments = tuple(parse_assignment(a, spec)
                          for a in split_top_level(body))
      fields = [f for f, _ in assignments]
      if len(set(fields)) != len(fields):
        raise ValueError(f'Sweep {spec!r}: a point sets a field twice.')
      label = label.strip() or ','.join(f'{f}={v}' for f, v in assignments)
      points.append(AxisValue(label, assignments))
    axis = Axis('', tuple(points))
    axis = dataclasses.replace(
        axis, name=name.strip() or '+'.join(axis.fields))
  labels = [v.label for v in axis.values]
  if len(set(labels)) != len(labels):
    raise ValueError(f'Sweep {spec!r}: repeated value or label in {labels}.')
  return axis


def parse_seeds(text: str) -> tuple[int, ...]:
  try:
    seeds = tuple(int(s) for s in split_top_level(text))
  except ValueError:
    raise ValueError(f'--seeds must be integers separated by commas, got '
                     f'{text!r}.') from None
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'--seeds has a repeated seed: {text!r}.')
  return seeds


def _folder_name(labels: Iterable[tuple[str, str]], seed: int) -> str:
  text = '__'.join(f'{a}={v}' for a, v in labels) + f'__seed={seed}'
  text = re.sub(r'[^A-Za-z0-9._=+-]+', '_', text).lstrip('_.')
  if len(text) > 150:  # file names are limited to 255 bytes
    text = text[:140] + '_' + hashlib.sha1(text.encode()).hexdigest()[:8]
  return text


def make_grid(axes: Sequence[Axis], seeds: Sequence[int],
              fixed: Sequence[tuple[str, str]] = ()) -> list[Point]:
  """Cartesian product of the axes, then seeds (the fastest-varying)."""
  if not seeds:
    raise ValueError('No seeds: give --seeds=0 or more.')
  names = [a.name for a in axes]
  if len(set(names)) != len(names) or _SEED_FIELD in names:
    raise ValueError(f'Two sweeps have the same name (or "seed"): {names}.')
  owner = {}
  for axis in axes:
    for field in axis.fields:
      if field in owner:
        raise ValueError(f'{field} is set by two sweeps: {owner[field]!r} and '
                         f'{axis.name!r}.')
      owner[field] = axis.name
  for field, _ in fixed:
    if field in owner:
      raise ValueError(f'{field} is both fixed (--set) and swept ({owner[field]}).')
  points = []
  for values in itertools.product(*(a.values for a in axes)):
    labels = tuple((a.name, v.label) for a, v in zip(axes, values))
    swept = tuple(kv for v in values for kv in v.assignments)
    for seed in seeds:
      points.append(Point(labels, seed,
                          (*fixed, *swept, (_SEED_FIELD, str(seed))),
                          _folder_name(labels, seed)))
  folders = [p.name for p in points]
  if len(set(folders)) != len(folders):
    duplicates = sorted(n for n, c in collections.Counter(folders).items() if c > 1)
    raise ValueError(f'Two points map to the same folder {duplicates[0]!r}: '
                     'give the linked points distinct labels.')
  return points


# ---------------------------------------------------------------- validation


def load_config(config_path: str, args: Sequence[str]):
  """The ConfigDict train.py would build from --config=config_path + args.

  Uses ml_collections config_flags as train.py does, so values parse the same
  way (the type of the existing field). Raises ValueError naming the flag.
  """
  argv = ['train.py', f'--config={config_path}', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Config file.',
                                  flag_values=flag_values, sys_argv=argv)
  try:
    with warnings.catch_warnings():
      # ml_collections loads the config file with importlib's deprecated
      # load_module(); train.py does the same, nothing for us to change.
      warnings.filterwarnings('ignore', 'the load_module', DeprecationWarning)
      flag_values(argv)
      return flag_values.config
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{" ".join(args) or config_path}: {e}') from None


def check_fields(config, fields: Iterable[str]) -> None:
  """ValueError naming the first field that config does not have."""
  for field in fields:
    node, path = config, []
    for part in field.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        known = sorted(node.keys()) if hasattr(node, 'keys') else []
        where = '.'.join(path) or 'the config'
        raise ValueError(f'Unknown config field {field!r}: {where} has no '
                         f'{part!r}' + (f'; it has {known}.' if known else '.'))
      node, path = node[part], [*path, part]


def validate_grid(config_path: str, points: Sequence[Point]) -> list:
  """Parses every point's config and runs the config checks; no training.

  Returns the configs in point order. Raises ValueError naming the point and
  the field for an unknown field, an unparsable value or an invalid config.
  """
  import experiment  # pylint: disable=g-import-not-at-top  (imports jax)
  if not os.path.isfile(config_path):
    raise ValueError(f'--config {config_path!r} is not a file.')
  if not points:
    raise ValueError('The sweep has no points.')
  check_fields(load_config(config_path, []),
               {field for point in points for field, _ in point.overrides})
  configs = []
  for point in points:
    config = load_config(config_path, point.args())
    try:
      experiment.validate_config(config)
    except ValueError as e:
      raise ValueError(f'Point {point.describe()}: {e}') from None
    configs.append(config)
  return configs


# ---------------------------------------------------------------- running


def point_command(config_path: str, point: Point, workdir: str,
                  python: str = sys.executable,
                  train_script: str = TRAIN_SCRIPT) -> list[str]:
  return [python, train_script, f'--config={config_path}',
          f'--workdir={workdir}', *point.args()]


# Runs in the child before train.py: SIGKILL it when the sweep process dies
# (Linux prctl PR_SET_PDEATHSIG, kept across exec), so a killed sweep leaves no
# training running that holds its workdir; the rerun resumes it from its
# checkpoint. An exec wrapper rather than subprocess's preexec_fn, which
# forks a parent that already runs JAX threads.
_DIE_WITH_PARENT = (
    'import ctypes, os, signal, sys\n'
    'if sys.platform == "linux":\n'
    '  ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n'
    '  if os.getppid() != int(sys.argv[1]): sys.exit(137)  # parent gone\n'
    'os.execv(sys.argv[2], sys.argv[2:])\n')


def launch_point(command: Sequence[str], workdir: str,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
  """Starts one point; stdout and stderr append to workdir/*.log.

  command[0] must be an executable path (e.g. sys.executable).
  """
  os.makedirs(workdir, exist_ok=True)
  wrapped = [sys.executable, '-c', _DIE_WITH_PARENT, str(os.getpid()),
             *command]
  with open(os.path.join(workdir, 'stdout.log'), 'ab') as out, \
       open(os.path.join(workdir, 'stderr.log'), 'ab') as err:
    return subprocess.Popen(wrapped, stdout=out, stderr=err, env=env,
                            cwd=_ROOT)


def classify(returncode: int, stderr: str) -> Outcome:
  """Outcome of a train.py exit code and the stderr it wrote.

  0 finished; 3 (or an older train.py's 1 with 'Training stopped: ... at
  step N') diverged; 143 / 130 with 'Stopped by SIG...' stopped (a
  checkpoint was written); 2 a user error (failed, with train.py's
  message); any other code crashed, with the last stderr lines.
  """
  lines = [l.strip() for l in stderr.splitlines() if l.strip()]
  tail = ' | '.join(lines[-_TAIL_LINES:])
  stopped = [l for l in lines if _STOPPED in l]
  step = _STEP_RE.search(stopped[-1]) if stopped else None
  if returncode == 0:
    return Outcome('finished', returncode=0)
  if returncode == errors.DIVERGED_EXIT_CODE or (returncode == 1 and step):
    return Outcome('diverged', stopped[-1] if stopped else tail,
                   int(step.group(1)) if step else None, returncode=returncode)
  signalled = [l for l in lines if l.split(': ', 1)[-1].startswith(
      'Stopped by SIG')]
  if returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT) and signalled:
    return Outcome('stopped', signalled[-1], returncode=returncode)
  if returncode == errors.USER_ERROR_EXIT_CODE or stopped:
    # train.py prints one or two lines; absl may add a usage hint after them.
    return Outcome('failed', stopped[-1] if stopped else ' | '.join(lines[-2:]),
                   returncode=returncode)
  if returncode < 0:
    tail = f'killed by signal {-returncode}' + (f': {tail}' if tail else '')
  return Outcome('crashed', tail, returncode=returncode)


def checkpoint_step(point_dir: str) -> int | None:
  """The newest checkpoint step under point_dir/checkpoints, None if none:
  the step train.py resumes from (an older one if that one is damaged).

  Read from the folder names: orbax gives a checkpoint its step as name only
  once it is complete, and temporary or damaged/ folders are not numbers.
  """
  try:
    names = os.listdir(os.path.join(point_dir, 'checkpoints'))
  except OSError:
    return None
  return max((int(n) for n in names if n.isdigit()), default=None)


def _read_status(point_dir: str) -> dict | None:
  try:
    with open(os.path.join(point_dir, STATUS_FILE)) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def code_version() -> str:
  """`git describe --always --dirty` of this checkout ('' without git).

  Recorded per point: a result is only comparable with others trained by
  the same code.
  """
  try:
    return subprocess.run(['git', 'describe', '--always', '--dirty'],
                          cwd=_ROOT, capture_output=True, text=True,
                          timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''


def _write_status(point_dir: str, point: Point, outcome: Outcome,
                  config_json: str, code: str) -> None:
  record = dataclasses.asdict(outcome) | {
      'code_version': code,
      'overrides': [list(o) for o in point.overrides],
      'config': json.loads(config_json)}
  path = os.path.join(point_dir, STATUS_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(path + '.tmp', path)  # never a half-written status


def final_eval(point_dir: str) -> dict:
  """The last 'eval' row of metrics.jsonl without step/kind ({} if none),
  plus train_end_loss / train_end_top1: the train rows' mean over the last
  10% of the steps (how well the run fits its training data at the end)."""
  path = os.path.join(point_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return {}
  last, train = {}, []
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        if row.get('kind') == 'eval':
          last = row
        elif row.get('kind') == 'train':
          train.append(row)
  result = {k: v for k, v in last.items() if k not in ('step', 'kind')}
  if train:
    end = [r for r in train if r['step'] > 0.9 * train[-1]['step']]
    for name in ('loss', 'top1'):
      values = [r[name] for r in end if name in r]
      if values:
        result[f'train_end_{name}'] = statistics.fmean(values)
  return result


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return (f'{hours}h{rest // 60:02d}m' if hours else
          f'{rest // 60}m{rest % 60:02d}s')


def run_points(config_path: str, workdir: str, points: Sequence[Point],
               configs: Sequence, parallel: int = 1,
               environments: Sequence[dict[str, str]] | None = None,
               log: Callable[[str], None] = print,
               after_each: Callable[[], None] | None = None,
               poll_s: float = 0.2) -> dict[str, Outcome]:
  """Runs the points not already done, `parallel` at a time.

  environments: one environment per parallel slot (default: this process's,
  with a shared XLA compilation cache under workdir so seeds and reruns of
  the same network compile once). after_each() runs after every finished
  point (e.g. to rewrite the reports). Returns {point name: Outcome} of the points
  run now.
  """
  if parallel < 1:
    raise ValueError(f'--parallel must be >= 1, got {parallel}.')
  if environments is None:
    base = dict(os.environ)
    base.setdefault('JAX_COMPILATION_CACHE_DIR',
                    os.path.join(os.path.abspath(workdir), '.xla_cache'))
    environments = [base] * parallel
  if len(environments) < parallel:
    raise ValueError(f'{len(environments)} environments for {parallel} '
                     'parallel slots.')
  config_json = {p.name: c.to_json_best_effort() for p, c in zip(points, configs)}
  todo = collections.deque()
  for point in points:
    status = _read_status(os.path.join(workdir, point.name))
    if (status and status['status'] in FINAL_STATUSES and
        status['config'] == json.loads(config_json[point.name])):
      continue
    todo.append(point)
  total, skipped = len(points), len(points) - len(todo)
  log(f'{total} points, {skipped} already done, {len(todo)} to run '
      f'({parallel} at a time).')
  # slot -> (point, process, start time, stderr offset, code version)
  running = {}
  outcomes, walls = {}, []
  started_at = time.time()
  try:
    while todo or running:
      for slot in range(parallel):
        if slot in running or not todo:
          continue
        point = todo.popleft()
        point_dir = os.path.join(workdir, point.name)
        stderr_path = os.path.join(point_dir, 'stderr.log')
        offset = os.path.getsize(stderr_path) if os.path.exists(stderr_path) else 0
        step = checkpoint_step(point_dir)  # before train.py writes new ones
        process = launch_point(point_command(config_path, point, point_dir),
                               point_dir, environments[slot])
        running[slot] = (point, process, time.time(), offset, code_version())
        log(f'[{skipped + len(outcomes)}/{total}] ' +
            (f'start {point.describe()}' if step is None else
             f'resume {point.describe()} (from step {step:,})'))
      time.sleep(poll_s)
      for slot, (point, process, start, offset, code) in list(running.items()):
        if process.poll() is None:
          continue
        del running[slot]
        point_dir = os.path.join(workdir, point.name)
        with open(os.path.join(point_dir, 'stderr.log'), 'rb') as f:
          f.seek(offset)
          stderr = f.read().decode(errors='replace')
        outcome = classify(process.returncode, stderr)
        outcome.wall_s = round(time.time() - start, 1)
        _write_status(point_dir, point, outcome, config_json[point.name], code)
        outcomes[point.name] = outcome
        walls.append(outcome.wall_s)
        done, left = skipped + len(outcomes), len(todo) + len(running)
        # Remaining work over the slots, at this invocation's mean wall time.
        eta = statistics.fmean(walls) * left / parallel
        metrics = final_eval(point_dir) if outcome.status == 'finished' else {}
        shown = ' '.join(f'{k}={v:.4f}' for k, v in metrics.items()
                         if k in ('top1', 'loss'))
        log(f'[{done}/{total}] {outcome.status} {point.describe()} '
            f'{shown}{" " + outcome.reason if outcome.reason else ""} '
            f'({outcome.wall_s:.0f} s); elapsed '
            f'{_format_duration(time.time() - started_at)}, ETA '
            f'{_format_duration(eta)}')
        if after_each:
          after_each()
  finally:
    for _, process, *_ in running.values():  # interrupted: stop children
      process.kill()
      process.wait()
  return outcomes


# ---------------------------------------------------------------- results


def collect(workdir: str, points: Sequence[Point]) -> list[dict]:
  """One row per point: axis labels, seed, outcome, final eval metrics."""
  rows = []
  for point in points:
    point_dir = os.path.join(workdir, point.name)
    status = _read_status(point_dir) or {'status': 'pending'}
    row = dict(point.labels)
    row.update(seed=point.seed, status=status['status'],
               reason=status.get('reason', ''),
               diverged_step=status.get('diverged_step'),
               wall_s=status.get('wall_s'))
    if status['status'] == 'finished':
      row.update(final_eval(point_dir))
    row['overrides'] = ' '.join(point.args()[:-1])  # seed has its column
    row['code_version'] = status.get('code_version', '')
    row['workdir'] = point.name
    rows.append(row)
  return rows


def metric_names(rows: Sequence[dict]) -> list[str]:
  fixed = set(_RUN_COLUMNS) | set(_TRAILING_COLUMNS)
  names = []
  for row in rows:
    names += [k for k in row if k not in fixed and k not in names]
  return names


def write_csv(path: str, axes: Sequence[Axis], rows: Sequence[dict]) -> None:
  axis_names = [a.name for a in axes]
  metrics = [m for m in metric_names(rows) if m not in axis_names]
  columns = [*axis_names, *_RUN_COLUMNS, *metrics, *_TRAILING_COLUMNS]
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns, restval='')
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ('' if v is None else v) for k, v in row.items()})


def summarize(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample standard deviation; 0 for one value)."""
  mean = statistics.fmean(values)
  return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _is_fraction(metric: str) -> bool:
  return metric.endswith(('top1', 'top5'))  # accuracies shown in percent


def _format_cell(values: Sequence[float], metric: str) -> str:
  if not values:
    return '-'
  mean, spread = summarize(values)
  scale, digits = (100, 2) if _is_fraction(metric) else (1, 4)
  text = f'{mean * scale:.{digits}f}'
  return text + (f' ± {spread * scale:.{digits}f}' if len(values) > 1 else '')


def _groups(axes: Sequence[Axis], rows: Sequence[dict]):
  """{tuple of axis labels: rows over seeds}, in grid order."""
  groups = {}
  for row in rows:
    groups.setdefault(tuple(row[a.name] for a in axes), []).append(row)
  return groups


def _outcome_text(group: Sequence[dict]) -> str:
  counts = collections.Counter(r['status'] for r in group)
  return ', '.join(f'{n} {s}' for s, n in counts.items())


def markdown_table(axes: Sequence[Axis], rows: Sequence[dict],
                   metrics: Sequence[str]) -> str:
  """One line per point: outcome counts and mean ± std over finished seeds."""
  header = [a.name for a in axes] + ['runs'] + [
      f'{m} (%)' if _is_fraction(m) else m for m in metrics] + ['wall s']
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  for labels, group in _groups(axes, rows).items():
    finished = [r for r in group if r['status'] == 'finished']
    cells = [_format_cell([r[m] for r in finished if m in r], m)
             for m in metrics]
    walls = [r['wall_s'] for r in group if r['wall_s'] is not None]
    lines.append('| ' + ' | '.join(
        [*labels, _outcome_text(group), *cells,
         f'{statistics.fmean(walls):.0f}' if walls else '-']) + ' |')
  return '\n'.join(lines)


def pivot_table(axes: Sequence[Axis], rows: Sequence[dict], x_axis: str,
                metric: str) -> str:
  """metric (mean ± std over finished seeds) with x_axis values as columns."""
  x = axis_by_name(axes, x_axis)
  others = [a for a in axes if a.name != x_axis]
  header = [a.name for a in others] + [f'{x_axis}={v.label}' for v in x.values]
  lines = ['| ' + ' | '.join(header or ['']) + ' |',
           '|' + '---|' * len(header)]
  table = {}
  for row in rows:
    key = tuple(row[a.name] for a in others)
    table.setdefault(key, {}).setdefault(row[x_axis], []).append(row)
  for key, by_x in table.items():
    cells = []
    for value in x.values:
      group = by_x.get(value.label, [])
      finished = [r[metric] for r in group
                  if r['status'] == 'finished' and metric in r]
      text = _format_cell(finished, metric)
      not_finished = len(group) - len(finished)
      if not_finished:
        text += f' ({not_finished}/{len(group)} ' + '/'.join(sorted(
            {r['status'] for r in group if r['status'] != 'finished'})) + ')'
      cells.append(text)
    lines.append('| ' + ' | '.join([*key, *cells]) + ' |')
  return '\n'.join(lines)


def axis_by_name(axes: Sequence[Axis], name: str) -> Axis:
  for axis in axes:
    if axis.name == name:
      return axis
  raise ValueError(f'--plot_x={name!r} is not a swept axis; axes: '
                   f'{[a.name for a in axes]}.')


def _numeric(labels: Sequence[str]) -> list[float] | None:
  try:
    return [float(label) for label in labels]
  except ValueError:
    return None


def plot(path: str, axes: Sequence[Axis], rows: Sequence[dict], x_axis: str,
         metric: str, title: str = '') -> None:
  """metric vs x_axis, one line per combination of the other axes.

  Mean over finished seeds with std error bars; numeric x on a log scale when
  its values span more than 10x; points where no seed finished are left out
  and counted in the legend.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not any(metric in r for r in rows):
    raise ValueError(f'--metric={metric!r} is in no finished run; have: '
                     f'{metric_names(rows) or "no finished runs"}.')
  x = axis_by_name(axes, x_axis)
  labels = [v.label for v in x.values]
  numeric = _numeric(labels)
  positions = numeric if numeric else list(range(len(labels)))
  others = [a for a in axes if a.name != x_axis]
  scale = 100 if _is_fraction(metric) else 1
  figure, ax = plt.subplots(figsize=(6.4, 4.4))
  lines = {}
  for row in rows:
    lines.setdefault(tuple(row[a.name] for a in others), []).append(row)
  for key, line_rows in lines.items():
    xs, means, spreads, lost = [], [], [], 0
    for position, label in zip(positions, labels):
      group = [r for r in line_rows if r[x_axis] == label]
      finished = [r[metric] * scale for r in group
                  if r['status'] == 'finished' and metric in r]
      lost += len(group) - len(finished)
      if finished:
        mean, spread = summarize(finished)
        xs.append(position)
        means.append(mean)
        spreads.append(spread)
    name = ', '.join(f'{a.name}={v}' for a, v in zip(others, key)) or metric
    if lost:
      name += f' ({lost} runs not finished)'
    ax.errorbar(xs, means, yerr=spreads, marker='o', capsize=3, label=name)
  if numeric and min(numeric) > 0 and max(numeric) / min(numeric) > 10:
    ax.set_xscale('log')
  if numeric:
    ax.set_xticks(positions, labels)
    ax.minorticks_off()
  else:
    ax.set_xticks(positions, labels, rotation=20 if len(labels) > 4 else 0)
  ax.set_xlabel(x_axis)
  ax.set_ylabel(f'{metric} (%)' if scale == 100 else metric)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=9)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def write_reports(workdir: str, axes: Sequence[Axis], points: Sequence[Point],
                  x_axis: str | None, metric: str) -> dict[str, str]:
  """results.csv, results.md and (if x_axis) METRIC_vs_AXIS.png in workdir.

  Returns {kind: path}. The plot needs at least one finished run.
  """
  rows = collect(workdir, points)
  paths = {'csv': os.path.join(workdir, 'results.csv'),
           'md': os.path.join(workdir, 'results.md')}
  write_csv(paths['csv'], axes, rows)
  metrics = [m for m in metric_names(rows)
             if m not in [a.name for a in axes] and m != 'examples']
  parts = [f'# Sweep results ({len(rows)} runs)', '',
           'Mean ± sample standard deviation over the seeds that finished; '
           '"runs" counts outcomes.', '', markdown_table(axes, rows, metrics)]
  if x_axis and metric in metrics:
    parts += ['', f'## {metric} by {x_axis}', '',
              pivot_table(axes, rows, x_axis, metric)]
  with open(paths['md'], 'w') as f:
    f.write('\n'.join(parts) + '\n')
  if x_axis and any(r['status'] == 'finished' for r in rows):
    name = re.sub(r'[^A-Za-z0-9._-]+', '_', f'{metric}_vs_{x_axis}')
    paths['png'] = os.path.join(workdir, f'{name}.png')
    plot(paths['png'], axes, rows, x_axis, metric)
  return paths


def default_plot_axis(axes: Sequence[Axis]) -> str | None:
  """The first axis with more than one value (None if there is none)."""
  return next((a.name for a in axes if len(a.values) > 1), None)

