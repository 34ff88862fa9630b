"""The one exception type for a user's mistake: the CLI prints its message on one line and exits 2."""


class PdmixError(Exception):
    """Bad input (a file, tensor or flag). The message names the culprit; no traceback is shown."""
