"""Exceptions for problems a user can fix. CLIs print their message as one line and exit non-zero."""


class Mb2poError(Exception):
    """Base class: the message is complete and names the file/flag and the problem."""


class DataError(Mb2poError):
    """A dataset file or name is missing, malformed, or does not match the environment."""


class ConfigError(Mb2poError):
    """A configuration (flags, preset, memory budget) cannot be run."""


class WorkdirError(Mb2poError):
    """A workdir cannot be used: in use by another process, not a directory, or one of its files damaged."""


class DivergedError(Mb2poError):
    """Training produced a non-finite loss or parameter; the newest checkpoint is the last finite state."""
