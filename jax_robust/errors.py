"""Errors a user can cause (bad flag, missing data, corrupt checkpoint).

The binaries in experiments/ turn these into one line on stderr and exit code 2.
"""


class UserError(ValueError):
    """A mistake in the configuration or the environment that the user can fix."""


class DataError(UserError):
    """A data set cannot be found or read."""


class CheckpointError(UserError):
    """A checkpoint is corrupt, incomplete or does not match the model."""


class Interrupted(Exception):
    """Work was asked to stop (SIGTERM, Ctrl-C); what was done is saved."""
