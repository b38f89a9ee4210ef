"""The two ways a command fails on purpose: bad input (exit 2), or a job that ran and failed (exit 1)."""


class InputError(Exception):
    """Bad input or usage. The CLI prints ``error: <message>`` on one line and exits 2.

    The message names the bad thing and how to fix it.
    """


class JobFailed(Exception):
    """The job ran and failed (a crash it could not recover from). The CLI prints ``error: <message>``
    on one line and exits 1; the message says what to do next."""
