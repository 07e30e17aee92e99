"""User-facing errors.

Anything a user can cause (a bad path, a corrupt file, an unsupported option) raises
`GemmakitError`; the CLI prints its message on one line and exits with status 2 instead of
showing a traceback. Programming errors stay ordinary exceptions.
"""


class GemmakitError(Exception):
    """An error caused by user input, with a message meant to be shown as is."""


class ModelFileError(GemmakitError):
    """A model file is missing, truncated, corrupt or of an unsupported kind."""


class ConfigError(GemmakitError):
    """A model configuration that gemmakit cannot honour exactly."""


class ContextLengthError(GemmakitError):
    """A prompt leaves no room in the context for a generated token."""
