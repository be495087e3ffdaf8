"""rosettalens: read, compare, map and steer the activation spaces of different language models."""

from .errors import RosettaError
from .hooks import HookedModel
from .models.loading import load
from .names import hook_name

__version__ = "0.1.0"
__all__ = ["HookedModel", "RosettaError", "hook_name", "load", "__version__"]
