"""Exception types that the command line maps to exit codes.

Exit code 2 means the user gave something invalid (a recipe, a data file, an
option) and can fix it; exit code 1 means mmtk failed for another reason.
"""


class MmtkError(Exception):
    """Failure that mmtk reports as one message, without a traceback."""

    exit_code = 1


class InputError(MmtkError):
    """Invalid user input: a recipe, an option, a data or checkpoint file."""

    exit_code = 2


class RecipeError(InputError):
    """A recipe key is unknown, missing, of the wrong type or out of range."""


class DataError(InputError):
    """A data file is missing, unreadable, malformed or contains invalid values."""


class StopRequested(MmtkError):
    """The run stopped early on SIGTERM or SIGINT after saving a checkpoint."""

    exit_code = 1


class Terminated(BaseException):
    """SIGTERM arrived outside a loop that checks a stop flag.

    Derives from BaseException, so library code that catches ``Exception``
    (for example around an optional import) cannot swallow the stop.
    """

    exit_code = 1
