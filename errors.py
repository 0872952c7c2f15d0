"""The one user-facing exception type.

Anything a user can cause (bad paths, bad checkpoints, bad parameters) raises `DualbrainError`;
the CLI prints its message on one line and exits with code 2. Internal bugs stay ordinary
exceptions with tracebacks.
"""


class DualbrainError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2
