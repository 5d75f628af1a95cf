"""Errors that teach: one line naming the field or file and how to fix it."""


class StaminaError(Exception):
    """Base class for every error the project raises on purpose."""


class ConfigError(StaminaError, ValueError):
    """A configuration value is invalid (names the field)."""


class AttachError(StaminaError, ValueError):
    """Adapters could not be attached (e.g. a target pattern matched nothing)."""


class FoldError(StaminaError, RuntimeError):
    """Folding was refused (NaN/Inf delta, folded twice, ...). Weights are left untouched."""


class TokenError(StaminaError, ValueError):
    """A concept token is invalid (already exists, not a single token, ...)."""


class CheckpointError(StaminaError, RuntimeError):
    """A checkpoint or saved model is missing, corrupt or does not match the model."""
