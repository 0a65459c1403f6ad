"""Which accelerator JAX runs on, as the scripts' start line, and a warning
when it runs on the CPU of a machine that has a GPU or TPU.

`pip install -r requirements.txt` installs a CPU-only jaxlib; on a GPU or
TPU machine JAX then runs on the CPU without an error. `accelerator_warning`
looks for the hardware itself (device files, the NVIDIA driver, PCI ids),
not at JAX, and names the install command (docs/accelerators.md).
"""

import glob
import importlib.metadata
import os
import shutil
from typing import Callable

import jax

# The install command for each accelerator, from the repository root.
INSTALL_COMMANDS = {
    'gpu': 'pip install -r requirements-cuda12.txt',
    'gpu_cuda13': 'pip install -r requirements-cuda13.txt',
    'tpu': 'pip install -r requirements-tpu.txt',
}
# JAX's accelerator plugins, by the pip package that holds them.
_ACCELERATOR_PACKAGES = ('jax-cuda12-plugin', 'jax-cuda13-plugin', 'libtpu')
# Google's PCI vendor id and the device ids of its TPU chips (v3 to 7x), as
# jax._src.hardware_utils lists them.
_GOOGLE_PCI_VENDOR = '0x1ae0'
_TPU_PCI_DEVICES = ('0x0027', '0x0056', '0x005e', '0x0062', '0x0063',
                    '0x006f', '0x0076')


def format_description(version: str, backend: str, device_kind: str,
                       local_devices: int, process_index: int,
                       process_count: int, device_count: int) -> str:
  """'JAX 0.10.2, backend gpu: 8 x NVIDIA H100 80GB HBM3 (process 0 of 2,
  16 devices in all)'; the part in parentheses only with several
  processes."""
  text = f'JAX {version}, backend {backend}: {local_devices} x {device_kind}'
  if process_count > 1:
    text += (f' (process {process_index} of {process_count}, '
             f'{device_count} devices in all)')
  return text


def describe() -> str:
  """This process's JAX backend and devices in one line (creates the JAX
  backend if none exists yet)."""
  local = jax.local_devices()
  return format_description(
      jax.__version__, jax.default_backend(), local[0].device_kind,
      len(local), jax.process_index(), jax.process_count(),
      jax.device_count())


def _read(path: str) -> str:
  try:
    with open(path, encoding='ascii', errors='replace') as f:
      return f.read().strip().lower()
  except OSError:
    return ''


def find_nvidia_gpus(root: str = '/',
                     which: Callable[[str], str | None] = shutil.which
                     ) -> list[str]:
  """What shows an NVIDIA GPU here: the device file /dev/nvidia0, the
  driver's /proc/driver/nvidia/gpus/* entries, or nvidia-smi on PATH.
  root and which stand in for '/' and shutil.which in tests."""
  found = sorted(glob.glob(os.path.join(root, 'dev', 'nvidia[0-9]*')))[:1]
  found += sorted(glob.glob(os.path.join(root, 'proc', 'driver', 'nvidia',
                                         'gpus', '*')))[:1]
  smi = which('nvidia-smi')
  if smi:
    found.append(smi)
  return found


def find_tpus(root: str = '/') -> list[str]:
  """What shows a Google TPU here: a PCI device with Google's vendor id and
  a TPU device id (/sys/bus/pci/devices/*/vendor and device; every TPU VM),
  or /dev/accel<N> (the chips' device files on TPU v2-v4 VMs). Newer TPU
  VMs expose their chips as /dev/vfio/<N>, which any VFIO passthrough
  device also creates, so that alone is not taken as a TPU."""
  found = []
  for vendor in sorted(glob.glob(os.path.join(root, 'sys', 'bus', 'pci',
                                              'devices', '*', 'vendor'))):
    device = os.path.join(os.path.dirname(vendor), 'device')
    if (_read(vendor) == _GOOGLE_PCI_VENDOR
        and _read(device) in _TPU_PCI_DEVICES):
      found.append(os.path.dirname(vendor))
      break
  found += sorted(glob.glob(os.path.join(root, 'dev', 'accel[0-9]*')))[:1]
  return found


def _installed(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def accelerator_warning(
    backend: str | None = None, root: str = '/',
    which: Callable[[str], str | None] = shutil.which,
    installed: Callable[[str], str | None] = _installed,
    environ=None) -> str | None:
  """One line when JAX runs on the CPU but this machine has an NVIDIA GPU or
  a TPU: what was found and the install command; None otherwise, and None
  when JAX_PLATFORMS is set (the user chose the platform).

  backend: jax.default_backend() unless given; root, which, installed
  (package -> version or None) and environ stand in for the machine in
  tests.
  """
  environ = os.environ if environ is None else environ
  if environ.get('JAX_PLATFORMS', '').strip():
    return None
  backend = jax.default_backend() if backend is None else backend
  if backend != 'cpu':
    return None
  gpus, tpus = find_nvidia_gpus(root, which), find_tpus(root)
  if not gpus and not tpus:
    return None
  kind, found = ('gpu', gpus) if gpus else ('tpu', tpus)
  what = 'an NVIDIA GPU' if kind == 'gpu' else 'a Google TPU'
  plugins = [f'{name} {installed(name)}' for name in _ACCELERATOR_PACKAGES
             if installed(name)]
  if plugins:  # installed, yet JAX fell back to the CPU
    return (f'JAX runs on the CPU, but this machine has {what} '
            f'({", ".join(found)}) and {", ".join(plugins)} is installed: '
            'JAX could not use it. Run python -c "import jax; '
            'print(jax.devices())" to see why (for a GPU: a driver too old '
            'for the CUDA version, or LD_LIBRARY_PATH pointing at other '
            'CUDA libraries); see docs/accelerators.md.')
  install = (f'{INSTALL_COMMANDS["gpu"]} (or {INSTALL_COMMANDS["gpu_cuda13"]}'
             ' for a CUDA 13 driver)' if kind == 'gpu'
             else INSTALL_COMMANDS['tpu'])
  return (f'JAX runs on the CPU, but this machine has {what} '
          f'({", ".join(found)}): the installed jaxlib is CPU-only. '
          f'Install JAX for it with: {install}')
