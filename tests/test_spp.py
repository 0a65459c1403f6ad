"""Signal Propagation Plots (nfnets.spp, spp.py): the tool end to end and
the paper's findings. (The statistics themselves: test_signal_stats.py.)"""

import csv
import functools
import glob
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from nfnets import resnet
from nfnets import spp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _quick_run(output_dir):
  """Runs `spp.py --config=configs/spp/quick.py` (4 models, 12 blocks, 64 px)."""
  result = subprocess.run(
      [sys.executable, 'spp.py', '--config=configs/spp/quick.py',
       f'--config.output_dir={output_dir}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(output_dir, 'spp.csv')) as f:
    rows = list(csv.DictReader(f))
  return result.stdout, rows


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  output_dir = str(tmp_path_factory.mktemp('spp'))
  stdout, rows = _quick_run(output_dir)
  by_model = {}
  for row in rows:
    by_model.setdefault(row['model'], []).append(row)
  series = {
      model: {field: np.array([float(r[field]) if r[field] else np.nan
                               for r in model_rows])
              for field in spp.CSV_FIELDS[1:]}
      for model, model_rows in by_model.items()}
  return output_dir, stdout, rows, series


def test_writes_png_csv_and_summary(quick):
  output_dir, stdout, rows, series = quick
  with open(os.path.join(output_dir, 'spp.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.path.getsize(os.path.join(output_dir, 'spp.png')) > 20_000
  assert set(series) == {'bn_relu_conv', 'relu_bn_conv', 'nf_he_init',
                         'nf_scaled_ws'}
  # One row per block (plus the stem, block 0) per model.
  assert len(rows) == 4 * (12 + 1)
  assert list(rows[0]) == list(spp.CSV_FIELDS)
  for values in series.values():
    np.testing.assert_array_equal(values['block'], np.arange(13))
    assert np.all(np.isfinite(values['residual_variance'][1:]))
  assert 'max sq. mean' in stdout
  summary_rows = [l for l in stdout.splitlines() if l.startswith('nf_he_init')]
  assert len(summary_rows) == 4  # one per stage


def _stage_slices(values):
  stages = values['stage'][1:].astype(int)
  return [np.flatnonzero(stages == s) + 1 for s in np.unique(stages)]


def test_relu_bn_conv_has_no_mean_shift_and_unit_branch_variance(quick):
  values = quick[3]['relu_bn_conv']
  assert np.all(values['squared_mean'][1:] < 0.01 * values['variance'][1:])
  # The convs after BN see zero-mean unit-variance input and are initialized
  # with fan-in scale 1 (conv_init='variance_preserving'): every branch
  # output has variance 1, so a stage of 3 blocks ends at 1 + 3.
  np.testing.assert_allclose(values['residual_variance'][1:], 1.0, rtol=0.2)
  ends = values['is_stage_end'] == 1
  np.testing.assert_allclose(values['variance'][ends], 4.0, rtol=0.15)


def test_bn_relu_conv_shows_mean_shift_and_branch_variance_below_one(quick):
  values = quick[3]['bn_relu_conv']
  for blocks in _stage_slices(values):
    assert values['squared_mean'][blocks[-1]] > values['squared_mean'][blocks[0]]
  # Var = E[x^2] - mean^2 with E[x^2] = 1 after BN-ReLU-He conv: 1 - 2/(2 pi).
  residual = values['residual_variance'][1:]
  assert np.all(residual < 1.0)
  assert np.mean(residual) == pytest.approx(1 - 1 / np.pi, abs=0.1)


@pytest.mark.parametrize('model', ['relu_bn_conv', 'bn_relu_conv',
                                   'nf_scaled_ws'])
def test_variance_grows_linearly_in_a_stage_and_resets(model, quick):
  values = quick[3][model]
  slices = _stage_slices(values)
  for blocks in slices:
    growth = np.diff(values['variance'][blocks])
    assert np.all(growth > 0)
    # Linear: each block adds about its residual-branch variance.
    branch = values['residual_variance'][blocks[1:]]
    np.testing.assert_allclose(growth, branch, rtol=0.35)
  for previous, current in zip(slices, slices[1:]):
    assert values['variance'][current[0]] < values['variance'][previous[-1]]


def test_nf_scaled_ws_tracks_relu_bn_conv_and_he_init_shifts_mean(quick):
  series = quick[3]
  nf, he, bn = (series[m] for m in ('nf_scaled_ws', 'nf_he_init',
                                    'relu_bn_conv'))
  # Like ReLU-BN-Conv: no mean shift, and the variance follows the analytic
  # expectation in the first stages (32 and 16 px feature maps here).
  assert np.all(nf['squared_mean'][1:] < 0.05 * nf['variance'][1:])
  early = nf['stage'] <= 2
  early[0] = False
  ratio = nf['variance'][early] / nf['expected_variance'][early]
  assert np.all((ratio > 0.7) & (ratio < 1.3)), ratio
  assert np.all(bn['squared_mean'][1:] < 0.05 * bn['variance'][1:])
  # He init: the squared channel mean grows within stages and dominates.
  for blocks in _stage_slices(he)[:2]:
    assert he['squared_mean'][blocks[-1]] > he['squared_mean'][blocks[0]]
  assert np.all(he['squared_mean'][1:] > 20 * nf['squared_mean'][1:])


def test_same_seed_same_numbers_and_different_seed_differs():
  config = resnet.make_config(depths=(1, 1, 1, 1), width=1 / 32,
                              skip_gain_init=1.0)
  first = spp.measure('a', config, 32, 4, seed=3)
  again = spp.measure('a', config, 32, 4, seed=3)
  other = spp.measure('a', config, 32, 4, seed=4)
  np.testing.assert_array_equal(first.variance, again.variance)
  np.testing.assert_array_equal(first.squared_mean, again.squared_mean)
  assert not np.array_equal(first.variance, other.variance)


@pytest.fixture
def no_measuring(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('a model was measured before the inputs were checked')
  monkeypatch.setattr(spp, 'measure', fail)


def _models(**last_overrides):
  return {'good': resnet.make_config(depths=(1, 1, 1, 1), width=1 / 32),
          'bad': resnet.make_config(depths=(1, 1, 1, 1), width=1 / 32,
                                    **last_overrides)}


@pytest.mark.parametrize('models,image_size,batch_size,message', [
    (_models(name='densenet'), 32, 4, "Unknown model 'densenet'"),
    (_models(), 16, 4, '16 px is too small'),
    (_models(name='bn_resnet'), 32, 1, 'batch_size=1 with BatchNorm'),
    ({}, 32, 4, 'No models'),
])
def test_bad_input_fails_before_any_measurement(
    models, image_size, batch_size, message, no_measuring, tmp_path):
  with pytest.raises(ValueError, match=message):
    spp.run(models, image_size, batch_size, 0, str(tmp_path))


def test_unwritable_output_folder(no_measuring, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  with pytest.raises(ValueError, match='Cannot create output folder'):
    spp.run(_models(), 32, 4, 0, str(blocker / 'out'))
  if os.geteuid() != 0:  # root may write anywhere
    read_only = tmp_path / 'read_only'
    read_only.mkdir()
    read_only.chmod(0o500)
    with pytest.raises(ValueError, match='not writable'):
      spp.run(_models(), 32, 4, 0, str(read_only))


def _load_preset(path):
  spec = importlib.util.spec_from_file_location('preset', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


PRESETS = sorted(glob.glob(os.path.join(ROOT, 'configs', 'spp', '*.py')))


@pytest.mark.parametrize('path', PRESETS, ids=os.path.basename)
def test_every_preset_validates(path):
  config = _load_preset(path)
  spp.check_preset(config)  # names, options, sizes: no compute
  assert config.models and config.batch_size >= 2


@pytest.mark.parametrize('field,value,message', [
    ('name', 'densenet', r"'bad'.*Unknown model 'densenet'; allowed: \(.*"
                         r"'nf_resnet'"),
    ('activation', 'swoosh', r"'bad'.*Unknown activation 'swoosh'; allowed: "
                             r"\[.*'silu'"),
])
def test_preset_with_unknown_name_is_refused(field, value, message):
  config = _load_preset(PRESETS[0])
  config.models['bad'] = resnet.make_config(**{field: value})
  with pytest.raises(ValueError, match=message):
    spp.check_preset(config)


def test_preset_with_image_below_stride_is_refused():
  config = _load_preset(PRESETS[0])
  config.image_size = 31
  with pytest.raises(ValueError, match='31 px is too small.*at least 32'):
    spp.check_preset(config)
  del config['seed']
  with pytest.raises(ValueError, match=r"lacks fields \['seed'\]"):
    spp.check_preset(config)


def test_stage_statistics_and_rendering():
  plan = spp.plan_from_depths((2, 3))
  stats = dict(squared_mean=np.arange(6.0) / 10, variance=np.arange(6.0),
               residual_variance=np.array([1.0, 3.0, 2.0, 4.0, 6.0]))
  assert spp.stage_statistics(stats, plan) == {
      'stage1/squared_mean': 0.2, 'stage1/variance': 2.0,
      'stage1/residual_variance': 2.0,
      'stage2/squared_mean': 0.5, 'stage2/variance': 5.0,
      'stage2/residual_variance': 4.0}
  image = spp.render([spp.from_stats('run', plan, stats, alpha=1.0)], 'step 7')
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert image.shape[0] > 200 and image.std() > 10  # not blank
  with pytest.raises(ValueError, match='do not fit'):
    spp.stage_statistics(dict(stats, variance=np.arange(5.0)), plan)
  with pytest.raises(ValueError, match=r"lacks \['residual_variance'\]"):
    spp.from_stats('run', plan, dict(squared_mean=stats['squared_mean'],
                                     variance=stats['variance']))


def _readme_example():
  """The python block after the spp-example marker in README.md."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  match = re.search(r'<!-- spp-example -->\s*```python\n(.*?)```', readme,
                    re.S)
  assert match, 'README.md lost its SPP example'
  return match.group(1)


def test_readme_example_measures_a_custom_model(tmp_path, monkeypatch):
  code = _readme_example()
  assert len(code.strip().splitlines()) <= 16
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  result = namespace['result']
  assert [spec.stage for spec in result.plan] == [0] * 4 + [1] * 4
  assert result.residual_variance.shape == (8,)
  # No normalization, He init, ReLU: the variance grows inside every stage.
  assert np.all(np.diff(result.variance) > 0)
  assert os.path.getsize(tmp_path / 'my_spp.png') > 20_000


def test_custom_model_with_wrong_statistics_fails_before_compute():
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  def forward(images):
    recorder = spp.SignalRecorder()
    x = hk.Conv2D(8, 3)(images)
    recorder.record_stem(x)
    recorder.record_block(x + x, x)
    return recorder.stats()

  with pytest.raises(ValueError, match='do not fit'):
    spp.measure_function('x', forward, 32, 2, stage_depths=(1, 1))
  with pytest.raises(ValueError, match='must return the statistics dict'):
    spp.measure_function('x', lambda images: jax.nn.relu(images), 32, 2)
  with pytest.raises(ValueError, match='image_size must be an integer >= 1'):
    spp.measure_function('x', forward, 0, 2)


def test_deep_networks_are_measured_scanned_and_jitted(monkeypatch):
  """A ResNet deeper than 32 blocks (block_loop 'auto') runs its stages as
  scans under jit, not op by op, and its NF variance still follows the
  analytic expectation in the first stages."""
  from nfnets import stacking  # pylint: disable=g-import-not-at-top
  scanned_layers = []
  scan_layers = stacking.scan_layers

  def spy(layer_fn, flat_names, *args):
    scanned_layers.append(len(flat_names))
    return scan_layers(layer_fn, flat_names, *args)

  monkeypatch.setattr(stacking, 'scan_layers', spy)
  config = resnet.make_config(depths=(12, 12, 12, 2), width=1 / 16,
                              alpha=1.0, skip_gain_init=1.0, num_classes=10)
  result = spp.measure('deep', config, image_size=64, batch_size=4)
  # Traced once for init and once for the measurement, 11 + 11 + 11 + 1
  # blocks per stage; the lone last block of stage 4 is not scanned.
  assert scanned_layers == [11, 11, 11] * 2
  ratio = result.variance[1:] / spp.expected_variances(result.plan, 1.0)[1:]
  assert np.all((ratio[:24] > 0.7) & (ratio[:24] < 1.3)), ratio


def test_cli_bad_preset_is_one_line_without_traceback():
  result = subprocess.run(
      [sys.executable, 'spp.py', '--config=configs/spp/quick.py',
       '--config.image_size=16'],
      cwd=ROOT,
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in result.stderr, lines
  assert '16 px is too small' in lines[0] and 'at least 32 px' in lines[0]
