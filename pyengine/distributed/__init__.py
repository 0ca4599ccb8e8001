"""pyengine beyond one machine, on Ray: corpus translation on Ray Data (`translate_dataset`, and the resumable
`translate_corpus` behind `pyengine translate --input/--output --ray`) and replicated serving on Ray Serve
(`deployment`, behind `pyengine serve --ray`). Ray is an optional extra: `pip install 'pyengine[ray]'`."""
from __future__ import annotations

from ..errors import PyEngineError

INSTALL = "pip install 'pyengine[ray]'  (or: pip install 'ray[data,serve]>=2.40')"


def require_ray():
    """The ray module, or an error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise PyEngineError(f"distributed translation and serving need Ray, which is not installed: {INSTALL}") from None
    return ray


def __getattr__(name: str):
    if name in ("translate_dataset", "EngineTranslator"):
        from . import corpus
        return getattr(corpus, name)
    if name == "translate_corpus":
        from . import files
        return files.translate_corpus
    if name in ("deployment", "serve_on_ray"):
        from . import serve
        return getattr(serve, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["require_ray", "translate_dataset", "translate_corpus", "deployment", "serve_on_ray", "EngineTranslator"]
