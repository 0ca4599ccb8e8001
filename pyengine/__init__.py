"""pyengine: a fast inference engine for encoder-decoder Transformer translation models."""
from .config import DecodeOptions, EngineConfig, ModelConfig
from .engine import Engine, StreamEvent, Translation
from .errors import BackendError, CheckpointError, InputError, OptionError, PyEngineError, UnknownFormatError
from . import _C  # (after torch, which the imports above load: the extension links against it)

_cpu_isa_error = _C.build_info()["cpu_isa_error"]
if _cpu_isa_error:  # a PYENGINE_MAX_CPU_ISA the kernels cannot apply: refused, not guessed at
    raise OptionError(_cpu_isa_error)

__version__ = "0.1.0"
__all__ = ["Engine", "Translation", "StreamEvent", "DecodeOptions", "EngineConfig", "ModelConfig", "PyEngineError",
           "InputError", "OptionError", "CheckpointError", "UnknownFormatError", "BackendError"]
