"""The one error type users see. The CLI prints its message and exits with code 2."""


class EdgepeftError(Exception):
    """Bad input or an artifact that breaks the contract.

    The message names the file, what is wrong and what to do; no traceback is shown for it.
    """
