"""The package version, in a leaf module: recording it in checkpoints must not import all of ``mas``."""

__version__ = "0.1.0"
