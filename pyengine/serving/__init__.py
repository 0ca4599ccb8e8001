"""Serving: the continuous-batching worker over the decode runtime (scheduler) and the HTTP front end (app)."""
from .app import create_app, serve
from .scheduler import QueueFullError, Scheduler

__all__ = ["create_app", "serve", "QueueFullError", "Scheduler"]
