"""rosettalens: read, compare, map and steer the activation spaces of different language models."""

from .errors import RosettaError
from .hooks import HookedModel
from .models.loading import load

__version__ = "0.1.0"
__all__ = ["HookedModel", "RosettaError", "load", "__version__"]
