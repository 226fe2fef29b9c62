"""User-facing errors: the CLI prints these as one line, never as a traceback."""


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
