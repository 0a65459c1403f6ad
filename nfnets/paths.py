"""Filesystem checks run before any heavy work."""

import os


def ensure_writable_dir(path: str, what: str) -> None:
  """Creates folder `path` if needed; raises ValueError naming `what` (e.g.
  'workdir') and the path if it cannot be created or written."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f'Cannot create {what} {path!r}: {e}') from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f'{what} {path!r} is not writable.')
