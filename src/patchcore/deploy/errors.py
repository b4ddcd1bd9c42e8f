"""Errors of the deployment wing that the command line reports on one line."""

from __future__ import annotations

__all__ = ["DeployError"]


class DeployError(RuntimeError):
    """A service or export cannot start: a missing extra, an unusable model or export folder, a bad option."""
