"""The one exception type that means "the user gave us something we cannot use"."""


class InputError(Exception):
    """Bad input or usage. The CLI prints ``error: <message>`` on one line and exits 2.

    The message names the bad thing and how to fix it.
    """
