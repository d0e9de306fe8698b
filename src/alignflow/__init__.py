"""alignflow: a reproducible, data-versioned pipeline from a base language model to an aligned one."""

__version__ = "0.1.0"
