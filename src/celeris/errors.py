"""User-facing errors.

Anything a user can cause (a wrong path, a malformed file, an option out of range) is raised as
`CelerisError` with a one-line message naming the problem; the CLI prints it and exits with 2.
"""


class CelerisError(Exception):
    """An error caused by the user's input, with a message fit to print on one line."""
