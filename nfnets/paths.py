"""Filesystem checks run before any heavy work."""

import os

from nfnets import errors


def ensure_writable_dir(path: str, what: str) -> bool:
  """Creates folder `path` if needed and returns whether it was created.

  Raises errors.UserError (a ValueError) naming `what` (e.g. 'workdir') and
  the path if it is a file, or cannot be created or written.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.UserError(f'{what} {path!r} is a file, not a folder; '
                           'choose another path.')
  created = not os.path.exists(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise errors.UserError(
        f'Cannot create {what} {path!r}: {e.strerror}.') from None
  if not os.access(path, os.W_OK | os.X_OK):
    if created:
      os.rmdir(path)
    raise errors.UserError(f'{what} {path!r} is not writable.')
  return created
