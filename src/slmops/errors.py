"""The one exception type that the CLI turns into a one-line message."""


class SlmopsError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""

    exit_code = 1


class NoImplementation(SlmopsError):
    """No plugin of a role accepts the request; the message lists why each declined."""


class UsageError(SlmopsError):
    """A value that can never work (a flag or an slmops.toml setting): refused before any work starts."""

    exit_code = 2
