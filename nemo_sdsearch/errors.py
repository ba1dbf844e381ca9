"""Errors a user can cause, shared by the modules that detect them (no imports: any module may use them)."""


class ConfigError(ValueError):
    """A bad config: the message names the key (`config key K: ...`) and the fix."""
