"""The command line's own error type."""


class CliError(Exception):
    """A bad argument or input; the command line prints the message and exits with status 2."""
