"""patchcore: PatchCore industrial visual anomaly detection, faithful to the paper and fast on a CPU."""

__version__ = "0.1.0"

from .model import ModelFileError, PatchCore, Prediction  # noqa: E402

__all__ = ["ModelFileError", "PatchCore", "Prediction", "__version__"]
