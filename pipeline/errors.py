"""The exceptions the command-line tools report as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (a config, a path, a name, a checkpoint): say what and where,
    then exit."""


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM): raised in the main thread, as KeyboardInterrupt
    is for Ctrl-C."""
