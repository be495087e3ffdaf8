"""Model zoo, loading (GGUF -> safetensors cache) and the architecture adapter table."""

from .adapters import ADAPTERS, Adapter, ModelConfig
from .loading import load, resolve
from .zoo import ZOO, ZooEntry, pull

__all__ = ["ADAPTERS", "Adapter", "ModelConfig", "ZOO", "ZooEntry", "load", "pull", "resolve"]
