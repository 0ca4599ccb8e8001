"""Translated files awaiting download (/translate_file answers with a URL to one): kept in a private temporary
directory, the oldest dropped past `keep`, all removed at shutdown."""
from __future__ import annotations

import re
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class FileStore:
    def __init__(self, keep: int):
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="pyengine-files-"))
        self.files: OrderedDict[str, Path] = OrderedDict()
        self.lock = threading.Lock()

    def put(self, filename: str, data: bytes) -> str:
        """Store a file; returns its download name ("<id>-<filename>")."""
        name = f"{uuid.uuid4().hex}-{SAFE.sub('_', Path(filename).name) or 'file'}"
        path = self.dir / name
        path.write_bytes(data)
        with self.lock:
            self.files[name] = path
            while len(self.files) > self.keep:
                _, old = self.files.popitem(last=False)
                old.unlink(missing_ok=True)
        return name

    def get(self, name: str) -> Path | None:
        with self.lock:
            return self.files.get(name)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
