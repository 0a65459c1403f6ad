"""Signal Propagation Plots: the tool end to end and the paper's findings."""

import csv
import functools
import os
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


def test_relu_bn_conv_has_no_mean_shift_and_constant_branch_variance(quick):
  values = quick[3]['relu_bn_conv']
  assert np.all(values['squared_mean'][1:] < 0.01 * values['variance'][1:])
  # The conv after BN sees zero-mean unit-variance input; He init's factor 2
  # (meant for a ReLU input) makes every branch output variance 2.
  np.testing.assert_allclose(values['residual_variance'][1:], 2.0, rtol=0.2)


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
