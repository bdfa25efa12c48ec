"""The SDK's own exception types. Every error a user can cause names the file, tensor or argument."""


class STError(Exception):
    """Base class of every error raised by st-sdk."""


class ConfigError(STError, ValueError):
    """A model configuration (config.json or GGUF metadata) is missing, malformed or unsupported."""


class WeightError(STError, ValueError):
    """A weight file is missing, truncated, or holds a tensor of the wrong shape or type."""


class TokenizerError(STError, ValueError):
    """A tokenizer or chat template cannot be loaded or applied."""


class InputError(STError, ValueError):
    """An argument passed to the API is invalid (token id out of range, empty prompt, too long...)."""


class BackendError(STError, RuntimeError):
    """A backend cannot be found, is unavailable, or failed validation."""


class BusyError(STError, RuntimeError):
    """The engine's queue of waiting requests is full: retry later (HTTP 503)."""
