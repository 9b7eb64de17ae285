"""The one exception type users see: a problem with their input, reported as one line."""


def one_line(text: str, limit: int = 1000) -> str:
    """``text`` as one printable line: whitespace runs become one space, other control characters are escaped and
    an overlong text is cut with an ellipsis (messages may quote a corrupt file's bytes)."""
    flat = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in " ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class PapaError(Exception):
    """Bad input (config, data, checkpoint): the CLI prints the message alone, on one line, and exits ``status``."""
    status = 2

    def __str__(self) -> str:
        return one_line(super().__str__())


class DiskError(PapaError):
    """The file system cannot take what a command must write (full disk, quota, read-only): another exit status."""
    status = 4
