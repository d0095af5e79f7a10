"""klpforge: turn a kernel source patch into a verified Linux live patch."""

__all__ = ["__version__"]
__version__ = "0.1.0"
