"""Exception types: bad input from a user is not an internal bug.

`InputError` carries a message meant for the person running the tool: it names the item
(file, key, option), the reason, and where possible the way out. Anything else that
escapes is a bug and keeps its traceback.
"""


class InputError(Exception):
    """A file, option or checkpoint the user gave us cannot be used as it is."""


class WeightsError(InputError):
    """A weights file does not match the architecture (missing/unexpected key, wrong shape)."""


class InferenceFailed(RuntimeError):
    """Some rows of a batch could not be inferred (e.g. a remote server failed); the rest have results.

    `errors[i]` is the message for row i (None where it succeeded); `outputs` holds every
    row's values (meaningless where errors[i] is set).
    """

    def __init__(self, message: str, errors: list, outputs: dict):
        super().__init__(message)
        self.errors = errors
        self.outputs = outputs
