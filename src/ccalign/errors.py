"""The error type for failures a user can fix (``ccalign`` prints its message as one line), and
the rule that a message never echoes unbounded input."""


class UserError(Exception):
    """Something about the input or the run that the message explains, with the fix."""


def shorten(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters, for a message that quotes what the user typed."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
