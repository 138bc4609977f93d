"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class OkdpipeError(Exception):
    """A problem the user can fix: the message names the problem and the fix, in one line."""

    exit_code = 1
