"""The marker every user-facing error carries (no imports: cheap to catch anywhere).

An exception deriving from :class:`UserError` has a message that is the whole story
for a user (which file, which key, what to do); the CLI prints it without a traceback.
"""


class UserError(Exception):
    """Mixin for errors whose message is enough for the user to act on."""
