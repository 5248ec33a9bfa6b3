"""The marker every user-facing error carries (no imports: cheap to catch anywhere).

An exception deriving from :class:`UserError` has a message that is the whole story
for a user (which file, which key, what to do); the CLI prints it without a traceback.
"""


class UserError(Exception):
    """Mixin for errors whose message is enough for the user to act on."""


class ConfigError(UserError, ValueError):
    """A params file or option that cannot be used; the message says which and why."""


def user_errors() -> tuple[type[Exception], ...]:
    """Every exception class whose message is meant for the user: :class:`UserError` and the storage
    layer's own base (``cache`` imports nothing from the library, so it cannot derive from this one)."""
    from cache.format import CacheError

    return (UserError, CacheError)
