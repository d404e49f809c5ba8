"""pyobcache: GGUF LLaMA / Qwen2 inference on ggml with a bounded KV cache evicted by OBCache.

>>> import pyobcache
>>> m = pyobcache.Model("smollm2-135m")
>>> m.generate("The capital of France is", max_new_tokens=16, temperature=0)
"""

from . import _core
from .compat import Llama
from .conversation import Session, SessionStats
from .kv import KVConfig, kv_cache_types, kv_methods
from .model import EvictionTrace, GenerationStats, Model
from .registry import REGISTRY, cached_path, fetch, list_models

__version__ = "0.1.0"

__all__ = [
    "Model",
    "KVConfig",
    "GenerationStats",
    "EvictionTrace",
    "Session",
    "Llama",
    "SessionStats",
    "kv_cache_types",
    "kv_methods",
    "fetch",
    "cached_path",
    "list_models",
    "REGISTRY",
    "__version__",
]
