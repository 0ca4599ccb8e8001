"""API keys and request limits, as LibreTranslate has them: `--api-keys FILE` makes a key required (403 for a
missing or unknown one), `--req-limit N` allows N requests a minute per key (per client address without keys),
answered 429 with Retry-After past it. The counting is the `limits` library's moving window (what
flask-limiter, LibreTranslate's limiter, runs on)."""
from __future__ import annotations

import math
import time
from pathlib import Path

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from ..errors import PyEngineError


class HTTPError(Exception):
    """A refused request: HTTP status, the message of its JSON body {"error": ...}, and headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def read_keys(path: str | Path) -> dict[str, int | None]:
    """An API keys file: one key a line, optionally followed by its own requests-per-minute limit; '#' comments."""
    keys: dict[str, int | None] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PyEngineError(f"cannot read the API keys file {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].isdigit()):
            raise PyEngineError(f"{path}, line {number}: expected 'KEY' or 'KEY REQUESTS_PER_MINUTE'")
        keys[fields[0]] = int(fields[1]) if len(fields) == 2 else None
    if not keys:
        raise PyEngineError(f"the API keys file {path} holds no key")
    return keys


class Access:
    """Decides whether a request may run: its key (when keys are required) and its share of the request limit."""

    def __init__(self, keys: dict[str, int | None] | None = None, req_limit: int | None = None):
        self.keys, self.req_limit = keys, req_limit
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    @property
    def keys_required(self) -> bool:
        return self.keys is not None

    def check(self, key: str | None, client: str) -> None:
        """Raise HTTPError (403 / 429) or count the request."""
        limit = self.req_limit
        if self.keys is not None:
            if not key:
                raise HTTPError(403, "Please provide an API key (api_key): this server requires one")
            if key not in self.keys:
                raise HTTPError(403, "Invalid API key")
            limit = self.keys[key] if self.keys[key] is not None else limit
        if not limit:
            return
        item = RateLimitItemPerMinute(limit)
        identity = f"key:{key}" if self.keys is not None else f"ip:{client}"
        if not self.limiter.hit(item, identity):
            reset = self.limiter.get_window_stats(item, identity).reset_time
            wait = max(1, math.ceil(reset - time.time()))
            raise HTTPError(429, f"Too many request limits violation: {limit} per minute; retry in {wait} s",
                               {"Retry-After": str(wait)})
