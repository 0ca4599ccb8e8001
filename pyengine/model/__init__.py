"""The model: modules (transformer), typed linear layers (linear), the implementations chosen per engine
(backends), the decoder's state (cache), the encoder memory (memory), the decoder steps (step), weight loading
(weights) and teacher forcing (forced)."""
from .backends import Ops, resolve_ops
from .cache import KVCache, RecurrentCache, Span
from .forced import ForcedDecoder
from .memory import Memory
from .transformer import Transformer
from .weights import load_weights

__all__ = ["Ops", "resolve_ops", "KVCache", "RecurrentCache", "Span", "ForcedDecoder", "Memory", "Transformer",
           "load_weights"]
