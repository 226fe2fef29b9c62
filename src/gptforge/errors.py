"""User-facing errors: the CLI prints these as one line, never as a traceback."""

import reprlib


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint, network) that names its fix.

    str() is one line: line breaks inside the message (e.g. from a key or value the user typed) are shown
    as \\n, unless `multiline=True` (a message that quotes the tail of a log)."""

    def __init__(self, *args, multiline: bool = False):
        super().__init__(*args)
        self.multiline = multiline

    def __str__(self) -> str:
        s = super().__str__()
        return s if self.multiline else s.replace("\r", "\\r").replace("\n", "\\n")


def show_value(value, limit: int = 80) -> str:
    """A value from a file or a client, for an error message: its repr on one line, at most `limit` characters.
    Never builds the full repr (a few hundred bytes of YAML aliases make a list of billions of leaves): containers
    are walked only a few levels and items deep, long strings and bytes are cut before they are repr'd."""
    r = " ".join(_BOUNDED.repr(value).split())
    return r if len(r) <= limit else r[:limit - 3] + "..."


class _BoundedRepr(reprlib.Repr):
    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxtuple, self.maxlist, self.maxarray, self.maxdict = 3, 4, 4, 4, 4
        self.maxset, self.maxfrozenset, self.maxdeque, self.maxstring, self.maxlong, self.maxother = 4, 4, 4, 60, 40, 40

    def repr_bytes(self, x, level):
        return repr(x[:self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    def repr_int(self, x, level):  # repr of an int over 4300 digits raises
        return super().repr_int(x, level) if x.bit_length() < 128 else f"<an int of {x.bit_length()} bits>"


_BOUNDED = _BoundedRepr()
