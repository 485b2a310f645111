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


class MissingExtraError(SelfspecError, ImportError):
    """A feature needs optional packages that are not installed (an extra: `selfspec[server]`...)."""


def require_extra(extra: str, *modules: str, what: str | None = None) -> None:
    """Raise `MissingExtraError` naming `pip install 'selfspec[EXTRA]'` when any of `modules` is
    not installed (looked up without importing them)."""
    from importlib.util import find_spec

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{', '.join(missing)} not installed (needed for {what or 'this'}); "
                                f"install the {extra!r} extra: pip install 'selfspec[{extra}]'")


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """`1 prompt`, `2 prompts` (`nouns`: an irregular plural) for user-facing messages."""
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"
