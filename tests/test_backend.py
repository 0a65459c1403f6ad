"""nfnets.backend: the start line, and the warning when JAX runs on the CPU
of a machine with an NVIDIA GPU or a TPU (machines faked under tmp_path)."""

import os

import jax
import pytest

from nfnets import backend


def _no_smi(name):
  del name
  return None


def _nothing_installed(package):
  del package
  return None


def _warning(root, backend_name='cpu', which=_no_smi,
             installed=_nothing_installed, environ=None):
  return backend.accelerator_warning(
      backend_name, root=str(root), which=which, installed=installed,
      environ={} if environ is None else environ)


def _touch(root, path, text=''):
  full = os.path.join(root, path)
  os.makedirs(os.path.dirname(full), exist_ok=True)
  with open(full, 'w') as f:
    f.write(text)
  return full


def _fake_pci(root, vendor, device, slot='0000:00:04.0'):
  _touch(root, f'sys/bus/pci/devices/{slot}/vendor', vendor + '\n')
  _touch(root, f'sys/bus/pci/devices/{slot}/device', device + '\n')


def test_description_of_one_and_of_several_processes():
  assert backend.format_description('0.10.2', 'gpu', 'NVIDIA H100 80GB HBM3',
                                    8, 0, 1, 8) == (
      'JAX 0.10.2, backend gpu: 8 x NVIDIA H100 80GB HBM3')
  assert backend.format_description('0.10.2', 'gpu', 'NVIDIA H100 80GB HBM3',
                                    8, 0, 2, 16) == (
      'JAX 0.10.2, backend gpu: 8 x NVIDIA H100 80GB HBM3 (process 0 of 2, '
      '16 devices in all)')


def test_describe_names_this_process_backend_and_devices():
  assert backend.describe() == (
      f'JAX {jax.__version__}, backend {jax.default_backend()}: '
      f'{jax.local_device_count()} x {jax.local_devices()[0].device_kind}')


def test_no_warning_on_a_machine_without_accelerators(tmp_path):
  _touch(tmp_path, 'dev/null')
  assert _warning(tmp_path) is None


@pytest.mark.parametrize('evidence', [
    'dev/nvidia0', 'proc/driver/nvidia/gpus/0000:01:00.0/information'])
def test_nvidia_gpu_found_by_its_files(tmp_path, evidence):
  path = _touch(tmp_path, evidence)
  found = path if evidence.startswith('dev') else os.path.dirname(path)
  warning = _warning(tmp_path)
  assert warning == (
      f'JAX runs on the CPU, but this machine has an NVIDIA GPU ({found}): '
      'the installed jaxlib is CPU-only. Install JAX for it with: pip '
      'install -r requirements-cuda12.txt (or pip install -r '
      'requirements-cuda13.txt for a CUDA 13 driver)')


def test_nvidia_gpu_found_by_nvidia_smi_on_path(tmp_path):
  warning = _warning(tmp_path, which={'nvidia-smi': '/usr/bin/nvidia-smi'}.get)
  assert '(/usr/bin/nvidia-smi)' in warning
  assert 'pip install -r requirements-cuda12.txt' in warning


@pytest.mark.parametrize('device_id', ['0x005e', '0x0063', '0x006f'])
def test_tpu_found_by_google_pci_ids(tmp_path, device_id):
  _fake_pci(tmp_path, '0x8086', '0x1237', '0000:00:00.0')  # not Google's
  _fake_pci(tmp_path, '0x1ae0', device_id)
  warning = _warning(tmp_path)
  assert warning == (
      'JAX runs on the CPU, but this machine has a Google TPU '
      f'({tmp_path}/sys/bus/pci/devices/0000:00:04.0): the installed jaxlib '
      'is CPU-only. Install JAX for it with: pip install -r '
      'requirements-tpu.txt')


def test_tpu_found_by_dev_accel(tmp_path):
  path = _touch(tmp_path, 'dev/accel0')
  assert f'a Google TPU ({path})' in _warning(tmp_path)


def test_neither_other_google_devices_nor_vfio_alone_are_tpus(tmp_path):
  _fake_pci(tmp_path, '0x1ae0', '0x0042')  # Google's virtual NIC
  _touch(tmp_path, 'dev/vfio/0')  # any VFIO passthrough device
  _touch(tmp_path, 'dev/accel/accel0')  # Linux accel class (e.g. an NPU)
  assert _warning(tmp_path) is None


def test_no_warning_when_jax_runs_on_the_accelerator(tmp_path):
  _touch(tmp_path, 'dev/nvidia0')
  assert _warning(tmp_path, backend_name='gpu') is None
  assert _warning(tmp_path, backend_name='tpu') is None


def test_no_warning_when_the_user_chose_the_platform(tmp_path):
  _touch(tmp_path, 'dev/nvidia0')
  assert _warning(tmp_path, environ={'JAX_PLATFORMS': 'cpu'}) is None
  assert _warning(tmp_path, environ={'JAX_PLATFORMS': ' '}) is not None


def test_installed_plugin_that_jax_did_not_use_is_named(tmp_path):
  _touch(tmp_path, 'dev/nvidia0')
  warning = _warning(tmp_path,
                     installed={'jax-cuda12-plugin': '0.10.2'}.get)
  assert 'jax-cuda12-plugin 0.10.2 is installed: JAX could not use it' in (
      warning)
  assert 'pip install -r' not in warning


def test_warning_is_one_line(tmp_path):
  _touch(tmp_path, 'dev/nvidia0')
  _fake_pci(tmp_path, '0x1ae0', '0x0063')
  for installed in (_nothing_installed, {'libtpu': '0.0.42.1'}.get):
    assert '\n' not in _warning(tmp_path, installed=installed)


def test_this_test_machine_gets_no_warning():
  # The tests run on CPU-only machines (no GPU, no TPU).
  if backend.find_nvidia_gpus() or backend.find_tpus():
    pytest.skip('this machine has an accelerator')
  assert backend.accelerator_warning() is None
