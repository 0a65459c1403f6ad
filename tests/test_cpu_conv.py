"""nfnets/cpu/conv.py: its CPU rewrites (im2col + matmul; lax conv with matmul
or canonical gradients; grouped lax conv with a batched-matmul weight
gradient) equal lax.conv_general_dilated (value and gradients, against
a float64 reference), auto takes each exactly where it says, and a full train
step gives the same loss and parameters as the plain path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiment
from configs import quickstart
from nfnets import layers
from nfnets import ops
from nfnets.cpu import conv

# Value and gradients of the float32 rewrite (and, as a check that the bound
# is meaningful, of float32 lax.conv) against float64 lax.conv + jax.grad:
# max |error| / max |reference| per output. float32 rounding gives a few
# 1e-7 here; a wrong window, stride or padding gives O(1).
RELATIVE_TOLERANCE = 1e-5

# (x shape [N, H, W, C_in], kernel (kh, kw), C_out, stride, padding).
CASES = [
    ((2, 4, 4, 16), (3, 3), 24, 2, 'SAME'),      # 2x2 out, stride 2
    ((2, 2, 2, 32), (3, 3), 32, 1, 'SAME'),      # 2x2 maps, stride 1
    ((1, 1, 1, 8), (3, 3), 8, 1, 'SAME'),        # 1x1 map, batch 1
    ((1, 3, 3, 8), (3, 3), 12, 1, 'SAME'),       # odd 3x3 map
    ((3, 5, 5, 8), (3, 3), 12, 2, 'SAME'),       # odd 5x5 map, stride 2
    ((3, 5, 5, 8), (3, 3), 12, 1, 'SAME'),       # odd 5x5 map
    ((2, 9, 9, 8), (3, 3), 8, 2, 'SAME'),        # larger odd map
    ((2, 16, 16, 8), (3, 3), 8, 1, 'SAME'),      # large map
    ((2, 16, 16, 8), (3, 3), 8, 2, 'SAME'),      # large map, stride 2
    ((2, 6, 6, 8), (3, 3), 8, 1, 'VALID'),
    ((2, 6, 7, 8), (3, 3), 8, (2, 1), [(0, 2), (1, 0)]),  # explicit pads
    ((2, 5, 5, 16), (1, 1), 24, 1, 'SAME'),      # 1x1
    ((2, 5, 5, 16), (1, 1), 24, 2, 'SAME'),      # 1x1 stride 2, odd map
    ((1, 4, 4, 16), (1, 1), 8, 2, 'SAME'),       # 1x1 stride 2, batch 1
    ((2, 9, 9, 3), (7, 7), 8, 2, 'SAME'),        # stem-like 7x7 / 2
    ((4, 2, 2, 256), (3, 3), 64, 1, 'SAME'),     # long reduction (K = 2304)
]


def _case_id(case):
  x_shape, kernel, out_channels, stride, padding = case
  return (f'x{"x".join(map(str, x_shape))}-k{kernel[0]}x{kernel[1]}-'
          f'o{out_channels}-s{stride}-{padding}').replace(' ', '')


def _reference_conv(x, w, stride, padding):
  strides = (stride, stride) if isinstance(stride, int) else stride
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=conv.DIMENSION_NUMBERS)


def _value_and_grads(conv_fn, x, w, cotangent):
  """(conv_fn(x, w), d<conv, cotangent>/dx, d<conv, cotangent>/dw)."""
  y, vjp = jax.vjp(conv_fn, x, w)
  return (y, *vjp(cotangent))


def _relative_error(value, reference) -> float:
  value, reference = np.asarray(value, np.float64), np.asarray(reference)
  return float(np.max(np.abs(value - reference)) / np.max(np.abs(reference)))


# conv_cpu_gradients is 'lax_matmul_grads' for 1x1 kernels and
# 'lax_canonical_grads' for larger ones.
REWRITES = {'im2col': conv.im2col_conv2d,
            'conv_cpu_gradients': conv.conv_cpu_gradients}


@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_rewrites_match_float64_conv_value_and_gradients(case):
  x_shape, kernel, out_channels, stride, padding = case
  rng = np.random.default_rng(sum(x_shape) + kernel[0] + out_channels)
  x = rng.standard_normal(x_shape)
  w = rng.standard_normal((*kernel, x_shape[-1], out_channels))
  out_shape = jax.eval_shape(
      lambda x, w: _reference_conv(x, w, stride, padding),
      jax.ShapeDtypeStruct(x_shape, jnp.float32),
      jax.ShapeDtypeStruct(w.shape, jnp.float32)).shape
  cotangent = rng.standard_normal(out_shape)
  with jax.enable_x64(True):
    reference = jax.jit(lambda x, w, c: _value_and_grads(
        lambda x, w: _reference_conv(x, w, stride, padding), x, w, c))(
            *(jnp.asarray(a, jnp.float64) for a in (x, w, cotangent)))
    reference = [np.asarray(r) for r in reference]
  assert reference[0].dtype == np.float64
  args32 = [jnp.asarray(a, jnp.float32) for a in (x, w, cotangent)]
  results = {name: jax.jit(lambda x, w, c, f=rewrite: _value_and_grads(
      lambda x, w: f(x, w, stride, padding), x, w, c))(*args32)
             for name, rewrite in REWRITES.items()}
  results['lax float32'] = jax.jit(lambda x, w, c: _value_and_grads(
      lambda x, w: _reference_conv(x, w, stride, padding), x, w, c))(*args32)
  for impl, outputs in results.items():
    for name, got, want in zip(('value', 'grad x', 'grad w'), outputs,
                               reference):
      assert got.shape == want.shape and got.dtype == jnp.float32, (impl,
                                                                    name)
      assert _relative_error(got, want) < RELATIVE_TOLERANCE, (impl, name)


# (x shape, kernel (kh, kw), C_out, stride, padding, feature_group_count).
GROUPED_CASES = [
    ((2, 8, 8, 16), (3, 3), 16, 1, 'SAME', 2),      # group width 8
    ((2, 9, 9, 16), (3, 3), 16, 2, 'SAME', 2),      # odd map, stride 2
    ((2, 4, 4, 24), (3, 3), 48, 1, 'SAME', 3),      # C_out / G != C_in / G
    ((2, 6, 5, 8), (3, 3), 8, (2, 1), [(0, 2), (1, 0)], 8),  # depthwise
    ((2, 5, 5, 16), (1, 1), 16, 2, 'VALID', 4),     # 1x1, stride 2
    ((2, 2, 2, 32), (3, 3), 32, 1, 'SAME', 4),      # 2x2 map
    ((2, 9, 8, 8), (2, 2), 8, 3, [(-1, 0), (1, -1)], 2),  # stride > kernel,
                                                          # cropping pads
]


@pytest.mark.parametrize('case', GROUPED_CASES,
                         ids=lambda c: _case_id(c[:5]) + f'-g{c[5]}')
def test_grouped_rewrite_matches_float64_conv_value_and_gradients(case):
  x_shape, kernel, out_channels, stride, padding, groups = case
  rng = np.random.default_rng(sum(x_shape) + groups)
  x = rng.standard_normal(x_shape)
  w = rng.standard_normal((*kernel, x_shape[-1] // groups, out_channels))
  strides = (stride, stride) if isinstance(stride, int) else stride

  def reference_conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=conv.DIMENSION_NUMBERS,
        feature_group_count=groups)

  cotangent = rng.standard_normal(jax.eval_shape(reference_conv, x, w).shape)
  with jax.enable_x64(True):
    reference = [np.asarray(r) for r in _value_and_grads(
        reference_conv, *(jnp.asarray(a, jnp.float64)
                          for a in (x, w, cotangent)))]
  def rewrite(x, w):
    return conv.grouped_conv_cpu_gradients(x, w, stride, padding, groups)

  args32 = [jnp.asarray(a, jnp.float32) for a in (x, w, cotangent)]
  got = jax.jit(functools.partial(_value_and_grads, rewrite))(*args32)
  for name, value, want in zip(('value', 'grad x', 'grad w'), got, reference):
    assert value.shape == want.shape and value.dtype == jnp.float32, name
    assert _relative_error(value, want) < RELATIVE_TOLERANCE, name


def test_grouped_convs_on_cpu_get_a_matmul_weight_gradient(conv_impl):
  """auto: no weight-gradient convolution (XLA:CPU's batch_group_count
  conv, much slower than the forward); plain: XLA's own."""
  x = jax.ShapeDtypeStruct((4, 8, 8, 32), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 8, 32), jnp.float32)

  def weight_gradient_convs():
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda w, x: jnp.sum(layers.conv2d(x, w, (1, 1), 'SAME', 4))))(w, x)
    return sum(1 for eqn in jaxpr.jaxpr.eqns
               if eqn.primitive.name == 'conv_general_dilated'
               and eqn.params['batch_group_count'] > 1)

  conv_impl('auto')
  assert (conv.choose_implementation(x.shape, w.shape, 1, 'SAME', 4)
          == 'lax_grouped_matmul_weight_grad')
  assert weight_gradient_convs() == 0
  conv_impl('plain')
  assert weight_gradient_convs() == 1


def _conv_outputs(jaxpr) -> list[tuple[int, ...]]:
  """Output shapes of every conv_general_dilated, sub-jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      shapes += _conv_outputs(sub)
  return shapes


def _conv_counts(x_shape, w_shape, stride) -> tuple[int, int, int]:
  """(convs in layers.conv2d's forward jaxpr, input-gradient convs (output
  shaped like x) in its gradient wrt x, weight-gradient convs (output
  shaped like the kernel) in its gradient wrt w)."""
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  w = jax.ShapeDtypeStruct(w_shape, jnp.float32)
  conv2d = lambda x, w: layers.conv2d(x, w, (stride, stride), 'SAME', 1)
  loss = lambda x, w: jnp.sum(conv2d(x, w))
  forward = jax.make_jaxpr(conv2d)(x, w)
  grad_x = jax.make_jaxpr(jax.grad(loss, argnums=0))(x, w)
  grad_w = jax.make_jaxpr(jax.grad(loss, argnums=1))(x, w)
  forward_shapes = _conv_outputs(forward.jaxpr)
  # Each gradient jaxpr also holds the forward pass: leave its convs out.
  return (len(forward_shapes),
          _conv_outputs(grad_x.jaxpr).count(tuple(x_shape))
          - forward_shapes.count(tuple(x_shape)),
          _conv_outputs(grad_w.jaxpr).count(tuple(w_shape))
          - forward_shapes.count(tuple(w_shape)))


def _noncanonical_convs(x_shape, w_shape, stride) -> int:
  """Convs in conv2d's gradient jaxpr whose dimension numbers are not
  NHWC/HWIO/NHWC: autodiff's weight gradient is one, which XLA:CPU runs
  slowly inside loops (the reason for 'lax_canonical_grads')."""
  canonical = jax.lax.conv_dimension_numbers(x_shape, w_shape,
                                             conv.DIMENSION_NUMBERS)
  grads = jax.make_jaxpr(jax.grad(
      lambda x, w: jnp.sum(conv.conv2d(x, w, stride)), argnums=(0, 1)))(
          jax.ShapeDtypeStruct(x_shape, jnp.float32),
          jax.ShapeDtypeStruct(w_shape, jnp.float32))

  def count(jaxpr):
    found = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        found += eqn.params['dimension_numbers'] != canonical
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        found += count(sub)
    return found
  return count(grads.jaxpr)


# (x shape, kernel shape, stride, implementation under auto on CPU).
DISPATCH = [
    ((32, 2, 2, 512), (3, 3, 512, 512), 1, 'im2col'),    # stage 4 at 64 px
    ((32, 4, 4, 256), (3, 3, 256, 512), 2, 'im2col'),    # 2x2 out
    ((8, 1, 1, 64), (3, 3, 64, 64), 1, 'im2col'),        # stage 4 at 32 px
    ((8, 3, 3, 64), (3, 3, 64, 64), 2, 'im2col'),        # odd map, 2x2 out
    ((32, 4, 4, 256), (3, 3, 256, 256), 1, 'lax_canonical_grads'),  # 4x4 out
    ((32, 7, 7, 512), (3, 3, 512, 512), 1, 'lax_canonical_grads'),  # 224 px
    ((32, 64, 64, 3), (7, 7, 3, 64), 2, 'lax_canonical_grads'),     # stem
    ((32, 2, 2, 512), (1, 1, 512, 2048), 1, 'lax_matmul_grads'),
    ((32, 56, 56, 256), (1, 1, 256, 512), 2, 'lax_matmul_grads'),
]
@pytest.mark.parametrize('x_shape,kernel,strides,pads', [
    ((2, 8, 8, 3), (3, 3), (2, 2), ((0, 1), (0, 1))),
    ((2, 9, 7, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((1, 7, 6, 2), (3, 2), (1, 2), ((1, 1), (0, 1))),
    ((1, 9, 9, 2), (2, 2), (3, 3), ((0, 0), (0, 0))),   # stride > kernel
    ((1, 8, 8, 2), (3, 3), (2, 2), ((-1, 0), (2, -1))),  # cropping pads
    ((2, 6, 5, 4), (1, 1), (2, 2), ((0, 0), (0, 0)))])
def test_strided_windows_transpose_is_the_adjoint(x_shape, kernel, strides,
                                                  pads):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  windows, vjp = jax.vjp(
      lambda x: conv.strided_windows(x, kernel, strides, pads), x)
  cotangents = [jnp.asarray(rng.standard_normal(w.shape), jnp.float32)
                for w in windows]
  got = conv.strided_windows_transpose(cotangents, x_shape, kernel, strides,
                                       pads)
  np.testing.assert_allclose(got, vjp(cotangents)[0], rtol=1e-6, atol=1e-6)


# _conv_counts per implementation: (forward convs, input-gradient convs,
# weight-gradient convs).
# ('lax_canonical_grads' has one weight-gradient conv too, but its output is
# [C_in, kh, kw, C_out], transposed after.)
CONV_COUNTS = {'lax': (1, 1, 1), 'im2col': (0, 0, 0),
               'lax_matmul_grads': (1, 0, 0),
               'lax_canonical_grads': (1, 1, 0)}


@pytest.mark.parametrize('x_shape, w_shape, stride, expected', DISPATCH)
def test_auto_takes_the_implementation_it_says(conv_impl, x_shape, w_shape,
                                               stride, expected):
  conv_impl('auto')
  assert jax.default_backend() == 'cpu'
  assert conv.choose_implementation(x_shape, w_shape, stride) == expected
  assert _conv_counts(x_shape, w_shape, stride) == CONV_COUNTS[expected]
  if expected == 'lax_canonical_grads':
    assert _noncanonical_convs(x_shape, w_shape, stride) == 0
  conv_impl('plain')
  assert _conv_counts(x_shape, w_shape, stride) == CONV_COUNTS['lax']


def test_other_backends_keep_the_plain_conv(conv_impl, monkeypatch):
  conv_impl('auto')
  for backend in ('gpu', 'tpu'):
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    assert not ops.cpu_forms_active()
    assert _conv_counts((32, 2, 2, 512), (3, 3, 512, 512), 1) == (
        CONV_COUNTS['lax'])
    assert _conv_counts((32, 8, 8, 512), (1, 1, 512, 128), 1) == (
        CONV_COUNTS['lax'])


def test_bad_arguments_raise_clear_errors(conv_impl):
  conv_impl('fast')
  with pytest.raises(ValueError, match="NFNETS_CONV_IMPL='fast'.*auto"):
    ops.configured_impl()
  conv_impl('auto')
  x, w = jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 8, 8))
  with pytest.raises(ValueError, match='stride.*0'):
    conv.conv2d(x, w, 0)
  with pytest.raises(ValueError, match="padding.*'FULL'"):
    conv.conv2d(x, w, 1, 'FULL')
  with pytest.raises(ValueError, match='8 channels.*feature_group_count'):
    conv.conv2d(x, jnp.zeros((3, 3, 4, 8)), 1)
  with pytest.raises(ValueError, match='empty output'):
    conv.conv2d(x, jnp.zeros((5, 5, 8, 8)), 1, 'VALID')
  with pytest.raises(ValueError, match=r'x \[N, H, W, C\]'):
    conv.conv2d(jnp.zeros((4, 4, 8)), w, 1)


def _train_two_steps(conv_impl, impl: str):
  """Loss of each step, final params, and whether the model traces any conv
  at 2x2 or smaller output, with NFNETS_CONV_IMPL=impl."""
  conv_impl(impl)
  config = quickstart.get_config()
  config.data.update(dict(name='fake', image_size=32, num_workers=0,
                          fake_train_size=16, fake_eval_size=16))
  config.train.update(dict(batch_size=16, eval_batch_size=16, steps=10))
  config.optim.warmup_epochs = 0.0  # full learning rate: parameters move
  exp = experiment.Experiment(config)
  state = exp.init_state()
  rng = np.random.default_rng(0)
  batch = {'images': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
           'labels': rng.integers(0, 10, (16,), dtype=np.int32)}
  losses = []
  for _ in range(2):
    state, metrics = exp.train_step(state, batch)
    losses.append(float(metrics['loss']))
  images = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda p, s, x: exp.model.apply(
      p, s, None, x, is_training=False))(state['params'], state['bn_state'],
                                         images)
  counts = _count_primitives(jaxpr.jaxpr)
  return losses, jax.tree.map(np.asarray, state['params']), counts


def _count_primitives(jaxpr) -> dict:
  """{'convs': conv_general_dilated count, 'convs_1x1': those with a 1x1
  kernel, 'custom_vjps': custom VJP calls}, sub-jaxprs included."""
  counts = {'convs': 0, 'convs_1x1': 0, 'custom_vjps': 0}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      counts['convs'] += 1
      counts['convs_1x1'] += eqn.invars[1].aval.shape[:2] == (1, 1)
    counts['custom_vjps'] += 'custom_vjp' in eqn.primitive.name
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      for key, value in _count_primitives(sub).items():
        counts[key] += value
  return counts


def test_train_step_auto_matches_plain(conv_impl):
  plain_losses, plain_params, plain_counts = _train_two_steps(conv_impl,
                                                              'plain')
  auto_losses, auto_params, auto_counts = _train_two_steps(conv_impl, 'auto')
  # At 32 px, stages 3 and 4 have 2x2 and 1x1 maps: their 3x3 convs (one per
  # block, depths (1, 1, 1, 1)) are im2col under auto; every 1x1 conv (two
  # per block and four shortcuts), the two other 3x3 convs and the stem are
  # custom-VJP convs. Each of the 17 WS convs adds two more custom VJPs
  # under auto (nfnets.cpu.reductions: standardization and bias with their
  # sums as matmuls), and the stem's max-pool one; plain rules those out too.
  assert plain_counts['custom_vjps'] == 0
  assert plain_counts['convs_1x1'] == 12
  assert auto_counts == dict(plain_counts, convs=plain_counts['convs'] - 2,
                             custom_vjps=15 + 2 * plain_counts['convs'] + 1)
  assert plain_losses[0] != plain_losses[1]  # the step changed the params
  # float32 sums in another order: the loss agrees to float32 rounding, and
  # two SGD steps amplify the difference in params only slightly.
  np.testing.assert_allclose(auto_losses, plain_losses, rtol=1e-5)
  assert (jax.tree.structure(auto_params)
          == jax.tree.structure(plain_params))
  for auto, plain in zip(jax.tree.leaves(auto_params),
                         jax.tree.leaves(plain_params)):
    np.testing.assert_allclose(auto, plain, rtol=1e-4,
                               atol=1e-5 * np.max(np.abs(plain)))
