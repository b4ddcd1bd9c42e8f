"""The package version (a leaf module, so every wing can read it without importing the package root)."""

__version__ = "0.1.0"
