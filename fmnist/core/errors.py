"""The two ways a command fails on purpose: bad input (exit 2), or a job that ran and failed (exit 1)."""


class InputError(Exception):
    """Bad input or usage. The CLI prints ``error: <message>`` on one line and exits 2.

    The message names the bad thing and how to fix it.
    """


class JobFailed(Exception):
    """The job ran and failed (a crash it could not recover from). The CLI prints ``error: <message>``
    on one line and exits 1; the message says what to do next."""


def error_line(error: BaseException | None, first: bool = False) -> str:
    """An error's message in one line: its last non-blank line (where Ray's errors put the cause,
    after a traceback), or with ``first`` its first; the error type's name where it has none."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return (lines[0 if first else -1] if lines else type(error).__name__)
