"""nfnets/timm_weights.py and tools/convert_timm.py: timm NF-ResNet weights
converted into our model give timm's logits (fixture made by
tools/make_timm_fixture.py with timm itself), on the CPU forms and the plain
formulas, unrolled and scanned; the model options that reproduce timm
(Scaled WS form, symmetric padding, avg-pool shortcut) each matter and are
validated; bad files and state dicts are refused with one line."""

import functools
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from nfnets import errors
from nfnets import layers
from nfnets import ops
from nfnets import resnet
from nfnets import timm_weights
import helpers

FIXTURE = os.path.join(helpers.ROOT, 'tests', 'fixtures', 'timm_nf_resnet')
MODEL_FILE = os.path.join(FIXTURE, 'model.safetensors')
# max |ours - timm| / max |timm| over the logits; float32 rounding in a
# different order gives about 6e-7.
LOGITS_TOLERANCE = 1e-4


@functools.cache
def _fixture():
  """(timm state dict, images NHWC, timm's logits)."""
  expected = safetensors_numpy.load_file(
      os.path.join(FIXTURE, 'expected.safetensors'))
  return (timm_weights.load_safetensors(MODEL_FILE),
          np.transpose(expected['images'], (0, 2, 3, 1)), expected['logits'])


def _relative_error(value, reference) -> float:
  value, reference = np.asarray(value, np.float64), np.asarray(reference)
  return float(np.max(np.abs(value - reference)) / np.max(np.abs(reference)))


def _logits(config, params, images):
  apply = jax.jit(resnet.build(config).apply, static_argnums=4)
  with jax.default_matmul_precision('highest'):  # no TF32 on GPUs
    return np.asarray(apply(params, {}, None, images, False)[0])


@pytest.mark.parametrize('impl,block_loop', [('auto', 'unrolled'),
                                             ('plain', 'scan')])
def test_converted_fixture_gives_timms_logits(conv_impl, impl, block_loop):
  conv_impl(impl)
  assert ops.cpu_forms_active() == (
      impl == 'auto' and jax.default_backend() == 'cpu')
  state_dict, images, want = _fixture()
  config = timm_weights.config_from_state_dict(state_dict)
  # What the tensors say: 1/16 width, stage 3 one block deeper than
  # nf_resnet26 (two identical blocks in a row, which a scan stacks).
  assert (config.depths, config.width, config.num_classes) == (
      (2, 2, 3, 2), 1 / 16, 10)
  config.block_loop = block_loop
  params = timm_weights.convert(state_dict, config)
  assert resnet.uses_scan(config) == (block_loop == 'scan')
  assert any('stacked' in module for module in params) == (
      block_loop == 'scan')
  got = _logits(config, params, images)
  assert _relative_error(got, want) < LOGITS_TOLERANCE
  assert np.array_equal(np.argmax(got, -1), np.argmax(want, -1))


@pytest.mark.parametrize('option', [
    dict(ws_form='authors', ws_eps=1e-4),
    dict(padding='same', strided_shortcut='conv'),
    dict(activation_gamma=None)], ids=['authors_ws', 'authors_layout',
                                       'closed_form_gamma'])
def test_the_authors_options_miss_timms_logits(option):
  # The fixture's random gains, biases and small-spread kernels make every
  # option visible: none of these comes within 10x of the tolerance (the
  # closed-form relu gamma, 0.06% off timm's, is 2.4e-3 off; the others
  # 0.3-1.2).
  state_dict, images, want = _fixture()
  config = timm_weights.config_from_state_dict(state_dict)
  params = timm_weights.convert(state_dict, config)
  config.update(option)
  assert _relative_error(_logits(config, params, images), want) > (
      10 * LOGITS_TOLERANCE)


def test_timm_ws_form_cpu_form_matches_float64_autodiff():
  rng = np.random.default_rng(0)
  shape = (3, 3, 8, 6)
  # Spreads from 1e-3 to 1e-1: eps = 1e-5 on the variance matters for some.
  weight = rng.standard_normal(shape) * np.logspace(-3, -1, shape[-1])
  gain = 1 + 0.5 * rng.standard_normal(shape[-1])
  cotangent = rng.standard_normal(shape)

  def value_and_grads(fn, w, g, dy):
    out, vjp = jax.vjp(lambda w, g: fn(w, g, 1e-5, 'timm'), w, g)
    return (out, *vjp(dy))

  with jax.enable_x64(True):
    args = [jnp.asarray(a, jnp.float64) for a in (weight, gain, cotangent)]
    want = jax.jit(functools.partial(
        value_and_grads, layers.standardize_weight.formula))(*args)
    want = [np.asarray(w) for w in want]
  # The formula itself: (W - mean) / sqrt(var + eps) * gain / sqrt(fan_in).
  centered = weight - weight.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(
      want[0], centered / np.sqrt(weight.var(axis=(0, 1, 2)) + 1e-5)
      * gain / np.sqrt(72), rtol=1e-12)
  got = jax.jit(functools.partial(
      value_and_grads, layers.standardize_weight.cpu_form))(
          *(jnp.asarray(a, jnp.float32) for a in (weight, gain, cotangent)))
  for value, reference in zip(got, want):
    assert _relative_error(value, reference) < 1e-5


def test_symmetric_max_pool_and_avg_pool_shortcut_match_pytorch_semantics():
  x = np.random.default_rng(0).standard_normal((1, 5, 7, 2)).astype(
      np.float32)
  # PyTorch MaxPool2d(3, 2, padding=1): -inf padding of 1 on every side,
  # floor((n + 2 - 3) / 2) + 1 outputs per axis.
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)),
                  constant_values=-np.inf)
  want = np.array([[[padded[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3, c].max()
                     for c in range(2)] for j in range(4)] for i in range(3)])
  got = layers.max_pool(jnp.asarray(x), 3, 2,
                        layers.window_padding('symmetric', 3, 2))
  np.testing.assert_array_equal(got[0], want)
  # AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False): the last
  # window of an odd side averages the pixels it has.
  want = np.array([[x[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(0, 1))
                    for j in range(4)] for i in range(3)])
  np.testing.assert_allclose(layers.avg_pool_downsample(jnp.asarray(x), 2)[0],
                             want, rtol=1e-6)
  assert layers.window_padding('symmetric', 7, 2) == ((3, 3), (3, 3))
  assert layers.window_padding('symmetric', 1, 1) == ((0, 0), (0, 0))
  assert layers.window_padding('same', 3, 2) == 'SAME'


@pytest.mark.parametrize('field,value,message', [
    ('ws_form', 'torch', r"Unknown ws_form 'torch'; allowed: \('authors', "
     r"'timm'\)"),
    ('padding', 'reflect', r"Unknown padding 'reflect'; allowed: \('same', "
     r"'symmetric'\)"),
    ('strided_shortcut', 'pool', r"Unknown strided_shortcut 'pool'; "
     r"allowed: \('conv', 'avg_pool_conv'\)")])
def test_model_options_are_validated(field, value, message):
  with pytest.raises(ValueError, match=message):
    resnet.validate_config(resnet.make_config(**{field: value}))


def test_timm_options_are_nf_resnet_only():
  with pytest.raises(ValueError, match="padding='symmetric' is an nf_resnet "
                     "option; bn_resnet has only padding='same'"):
    resnet.validate_config(resnet.make_config(name='bn_resnet',
                                              padding='symmetric'))
  with pytest.raises(ValueError, match="ws_form='timm' needs use_scaled_ws"):
    resnet.validate_config(resnet.make_config(ws_form='timm',
                                              use_scaled_ws=False))


def test_config_for_sets_the_timm_options():
  config = timm_weights.config_for('nf_resnet50')
  resnet.validate_config(config)
  assert config.variant == 'ResNet50' and config.skip_gain_init == 1.0
  assert {k: config[k] for k in timm_weights.TIMM_OPTIONS} == (
      timm_weights.TIMM_OPTIONS)
  with pytest.raises(errors.UserError, match="Unknown timm model "
                     "'nf_regnet_b1'; allowed: .*'nf_resnet50'"):
    timm_weights.config_for('nf_regnet_b1')


def _write(path, data: bytes) -> str:
  with open(path, 'wb') as f:
    f.write(data)
  return str(path)


def test_pickle_torch_and_truncated_files_are_refused(tmp_path):
  with pytest.raises(errors.UserError, match='pickle or torch.save file'):
    timm_weights.load_safetensors(_write(tmp_path / 'model.pth',
                                         b'\x80\x04\x95' + b'\0' * 64))
  with zipfile.ZipFile(tmp_path / 'torch.pt', 'w') as archive:
    archive.writestr('archive/data.pkl', b'\x80\x02.')
  with pytest.raises(errors.UserError, match='pickle or torch.save file'):
    timm_weights.load_safetensors(str(tmp_path / 'torch.pt'))
  with open(MODEL_FILE, 'rb') as f:
    data = f.read()
  with pytest.raises(errors.UserError, match='truncated'):
    timm_weights.load_safetensors(_write(tmp_path / 'cut.safetensors',
                                         data[:len(data) // 2]))
  with pytest.raises(errors.UserError, match='does not exist'):
    timm_weights.load_safetensors(str(tmp_path / 'missing.safetensors'))


def _config():
  return timm_weights.config_from_state_dict(_fixture()[0])


def test_a_tensor_of_another_shape_is_named_with_both_shapes():
  state_dict = dict(_fixture()[0])
  state_dict['stages.2.1.conv2.weight'] = np.zeros((16, 16, 1, 1),
                                                   np.float32)
  with pytest.raises(errors.UserError, match=(
      r"^Tensor 'stages.2.1.conv2.weight' has shape \(16, 16, 1, 1\); the "
      r'model \(depths 2-2-3-2, width 0.0625, 10 classes\) expects '
      r'\(16, 16, 3, 3\)[^\n]*$')):
    timm_weights.convert(state_dict, _config())


def test_other_widths_depths_and_extra_or_missing_tensors_are_named():
  state_dict = _fixture()[0]
  with pytest.raises(errors.UserError, match=(
      r"^Tensor 'stem.conv.weight' has shape \(4, 3, 7, 7\); the model "
      r'\(depths 3-4-6-3, width 1, 1000 classes\) expects \(64, 3, 7, 7\) '
      r'\(the state dict holds depths 2-2-3-2, width 0.0625, '
      r'10 classes\)\.$')):
    timm_weights.convert(state_dict, timm_weights.config_for('nf_resnet50'))
  extra = dict(state_dict, **{'stages.3.2.conv1.weight': np.zeros(1)})
  with pytest.raises(errors.UserError, match=(
      r"1 tensor\(s\) of the state dict are not used by the model \(depths "
      r"2-2-3-2.*first 'stages.3.2.conv1.weight'")):
    timm_weights.convert(extra, _config())
  missing = {k: v for k, v in state_dict.items() if k != 'stages.1.1.conv3.gain'}
  with pytest.raises(errors.UserError, match=(
      r"no tensor 'stages.1.1.conv3.gain' \(32, 1, 1, 1\)")):
    timm_weights.convert(missing, _config())
  with pytest.raises(errors.UserError, match=(
      r"differs from timm's NF-ResNet in \{'ws_form': 'authors'")):
    timm_weights.convert(state_dict, resnet.make_config(
        **{**_config().to_dict(), 'ws_form': 'authors'}))


@pytest.mark.parametrize('keys,message', [
    (['stem.conv.weight', 'stages.0.0.attn.fc1.weight', 'final_conv.weight',
      'head.fc.weight'], "an NF-RegNet.*differs from the authors' "
     r"NF-RegNets.*multiple of 8.*cannot be imported"),
    (['stem.conv1.weight', 'stages.0.0.conv2b.weight', 'head.fc.weight'],
     r'an NFNet.*does not implement'),
    (['stem.conv.weight', 'stages.0.0.attn_last.fc1.weight',
      'head.fc.weight'], 'squeeze-excite or ECA'),
    (['conv1.weight', 'bn1.running_mean', 'fc.weight'],
     "Not a timm NF-ResNet state dict.*'conv1.weight'"),
])
def test_other_timm_architectures_are_refused_with_the_reason(keys, message):
  state_dict = {key: np.zeros((8, 8, 1, 1), np.float32) for key in keys}
  with pytest.raises(errors.UserError, match=message):
    timm_weights.convert(state_dict, timm_weights.config_for('nf_resnet50'))
  with pytest.raises(errors.UserError, match=message):
    timm_weights.config_from_state_dict(state_dict)


def test_cli_refuses_an_existing_out_and_bad_input(tmp_path):
  out = _write(tmp_path / 'taken.safetensors', b'mine')
  before = os.stat(out)
  result = helpers.run(['-m', 'tools.convert_timm',
                        f'--timm_weights={MODEL_FILE}', '--model=nf_resnet26',
                        f'--out={out}'], check=False)
  assert result.returncode == errors.USER_ERROR_EXIT_CODE
  assert result.stderr.strip().splitlines() == [
      f'convert_timm.py: error: {out} exists; choose another --out (weights '
      'files are never overwritten).']
  assert open(out, 'rb').read() == b'mine'
  assert os.stat(out).st_mtime_ns == before.st_mtime_ns
  # A pickle as input: one line, nothing written.
  pickle = _write(tmp_path / 'model.pth', b'\x80\x04\x95' + b'\0' * 64)
  result = helpers.run(['-m', 'tools.convert_timm', f'--timm_weights={pickle}',
                        '--model=nf_resnet50',
                        f'--out={tmp_path / "new.safetensors"}'], check=False)
  assert result.returncode == errors.USER_ERROR_EXIT_CODE
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'is a pickle or torch.save file' in lines[0]
  assert sorted(os.listdir(tmp_path)) == ['model.pth', 'taken.safetensors']
