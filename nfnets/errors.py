"""Errors a user can fix: scripts print their message, without a traceback,
and exit with USER_ERROR_EXIT_CODE. Anything else is a bug and keeps its
traceback."""

import errno

USER_ERROR_EXIT_CODE = 2
DIVERGED_EXIT_CODE = 3


class UserError(ValueError):
  """A bad config value, a busy or mismatched workdir, missing data, a full
  disk: the message says what to change."""


class TrainingDiverged(UserError):
  """The loss became NaN or Inf; no checkpoint was written for it."""


_NO_SPACE_MARKERS = ('No space left', 'RESOURCE_EXHAUSTED', 'ENOSPC',
                     'Disk quota exceeded')


def is_disk_full(error: BaseException) -> bool:
  """Whether error, or an error it was raised from, is a full disk (or a
  storage library's report of one)."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC,
                                                      errno.EDQUOT):
      return True
    if any(marker in str(error) for marker in _NO_SPACE_MARKERS):
      return True
    error = error.__cause__ or error.__context__
  return False
