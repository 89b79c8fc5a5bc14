"""One exception type for mistakes a user can fix (bad files, bad config values).

The CLI prints these as a single line (``error: ...``) instead of a traceback; every message
says what is wrong and how to fix it.
"""


class RecpostError(ValueError):
    """A user-fixable problem: the message names the problem and the fix."""
