"""Error types. A user mistake raises a subclass of `SelfspecError` whose message is one sentence
naming the bad value and what would be valid; the CLI prints it without a traceback."""


class SelfspecError(Exception):
    """Base class of every error that a user's input can cause."""


class ModelLoadError(SelfspecError):
    """Unknown model alias or path, corrupt or unsupported model file, missing package."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture is not one our decoder implements."""


class InvalidParameterError(SelfspecError, ValueError):
    """A generation or sampling parameter is out of its valid range."""


class ContextOverflowError(SelfspecError):
    """Prompt plus requested tokens do not fit into the context."""


class SkipConfigError(SelfspecError):
    """A skip-set config is malformed or was made for another model."""


class DrafterError(SelfspecError):
    """A drafter cannot be used with this model (vocabulary mismatch, missing config...)."""
