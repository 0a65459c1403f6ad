"""The install files: requirements.txt stays CPU-only, and each accelerator
file is requirements.txt plus JAX for that accelerator at the same
version (docs/accelerators.md)."""

import os
import re

import pytest

from nfnets import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATOR_FILES = {'requirements-cuda12.txt': 'cuda12',
                     'requirements-cuda13.txt': 'cuda13',
                     'requirements-tpu.txt': 'tpu'}


def _requirements(name: str) -> list[str]:
  """The file's requirement lines, comments and blank lines dropped."""
  with open(os.path.join(ROOT, name), encoding='utf-8') as f:
    lines = [line.split('#', 1)[0].strip() for line in f]
  return [line for line in lines if line]


def _pins(lines: list[str]) -> dict[str, str]:
  """{'name[extras]': version} of the name==version lines."""
  pins = {}
  for line in lines:
    match = re.fullmatch(r'([A-Za-z0-9_.\-]+(?:\[[a-z0-9_,\-]+\])?)==(\S+)',
                         line)
    if match:
      pins[match.group(1).lower()] = match.group(2)
  return pins


def test_requirements_txt_is_cpu_only_with_one_jax_version():
  lines = _requirements('requirements.txt')
  pins = _pins(lines)
  assert pins['jax'] == pins['jaxlib'], pins
  accelerator_lines = [line for line in lines
                       if re.search(r'cuda|tpu|rocm|\[', line, re.I)]
  assert accelerator_lines == []


@pytest.mark.parametrize('name, extra', sorted(ACCELERATOR_FILES.items()))
def test_accelerator_file_adds_jax_for_it_at_the_same_version(name, extra):
  jax_version = _pins(_requirements('requirements.txt'))['jax']
  assert _requirements(name) == ['-r requirements.txt',
                                 f'jax[{extra}]=={jax_version}']


def test_the_install_commands_the_warning_names_exist():
  for command in backend.INSTALL_COMMANDS.values():
    file_name = command.rsplit(' ', 1)[-1]
    assert file_name in ACCELERATOR_FILES, command
    assert os.path.isfile(os.path.join(ROOT, file_name)), command


def test_docs_give_each_install_command_as_typed():
  with open(os.path.join(ROOT, 'docs', 'accelerators.md'),
            encoding='utf-8') as f:
    docs = f.read()
  for name in ACCELERATOR_FILES:
    assert f'pip install -r {name}\n' in docs, name
