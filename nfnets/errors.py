"""Errors a user can fix: scripts print their message, without a traceback,
and exit with USER_ERROR_EXIT_CODE. Anything else is a bug and keeps its
traceback."""

USER_ERROR_EXIT_CODE = 2
DIVERGED_EXIT_CODE = 3


class UserError(ValueError):
  """A bad config value, a busy or mismatched workdir, missing data, a full
  disk: the message says what to change."""


class TrainingDiverged(UserError):
  """The loss became NaN or Inf; no checkpoint was written for it."""
