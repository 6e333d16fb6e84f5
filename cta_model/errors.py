"""Error types the package raises for bad input; messages name the file, sample, field or flag."""


class CtaError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(CtaError, ValueError):
    """A configuration file, flag or option is invalid."""


class DataError(CtaError, ValueError):
    """A dataset file, sample or field is missing, corrupt or inconsistent."""


class TrainingError(CtaError):
    """A training run diverged or ended without a usable model (nothing is written or logged)."""
