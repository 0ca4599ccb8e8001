"""pyengine: a fast inference engine for encoder-decoder Transformer translation models."""
from .config import DecodeOptions, EngineConfig, ModelConfig
from .engine import Engine, StreamEvent, Translation
from .errors import BackendError, CheckpointError, InputError, OptionError, PyEngineError, UnknownFormatError

__version__ = "0.1.0"
__all__ = ["Engine", "Translation", "StreamEvent", "DecodeOptions", "EngineConfig", "ModelConfig", "PyEngineError",
           "InputError", "OptionError", "CheckpointError", "UnknownFormatError", "BackendError"]
