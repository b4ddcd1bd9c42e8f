"""patchcore: PatchCore industrial visual anomaly detection, faithful to the paper and fast on a CPU.

Wings (sub-packages), imports running one way only, checked by ``lint-imports`` (pyproject.toml):
``app`` -> ``deploy`` | ``distributed`` | ``evaluation`` -> ``engine`` -> ``data`` | ``heatmaps`` -> ``fileio``.
"""

from ._version import __version__
from .engine.model import ModelFileError, PatchCore, Prediction

__all__ = ["ModelFileError", "PatchCore", "Prediction", "__version__"]
