"""Serving: the continuous-batching worker over the decode runtime (scheduler) and the HTTP front end (app).

`from pyengine.serving import Scheduler` does not import the web stack; create_app and serve do."""
from .scheduler import QueueFullError, Scheduler

__all__ = ["create_app", "serve", "QueueFullError", "Scheduler"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app
        return create_app
    if name == "serve":
        from .processes import serve
        return serve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
