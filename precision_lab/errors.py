"""Errors a user can cause; the CLI prints their message as one sentence and exits 2."""


class UsageError(ValueError):
    """Bad input from the user: a wrong name, a missing file, a corrupt baseline."""
