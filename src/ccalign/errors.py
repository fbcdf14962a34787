"""The error type for failures a user can fix; ``ccalign`` prints its message as one line."""


class UserError(Exception):
    """Something about the input or the run that the message explains, with the fix."""
