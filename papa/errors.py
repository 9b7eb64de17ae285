"""The one exception type users see: a problem with their input, reported as one line."""


class PapaError(Exception):
    """Bad input (config, data, checkpoint): the CLI prints the message alone and exits non-zero."""
