"""The one exception nectar raises for problems a user can fix."""


class NectarError(Exception):
    """A problem the user can fix. The CLI prints its message on one line, no traceback."""
