"""pyproject.toml: `pip install .` ships every nfnets package and the
pinned requirements."""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_nfnets_package_is_listed_and_dependencies_are_the_pins():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)
  packages = set(project['tool']['setuptools']['packages'])
  on_disk = {os.path.relpath(folder, ROOT).replace(os.sep, '.')
             for folder, _, files in os.walk(os.path.join(ROOT, 'nfnets'))
             if '__init__.py' in files}
  assert packages == on_disk
  assert project['tool']['setuptools']['dynamic']['dependencies'] == {
      'file': ['requirements.txt']}
  assert os.path.isfile(os.path.join(ROOT, 'LICENSE'))
  with open(os.path.join(ROOT, 'LICENSE')) as f:
    assert 'Apache License' in f.read(200)
