"""LibreTranslate's API as this engine's model answers it: languages, the source/target check, `alternatives` as
forms send it, and the front-end settings its page and clients read."""
from __future__ import annotations

import re
from typing import Any

from ..config import ServerConfig
from ..documents import language_name
from ..documents.files import FILE_TYPES
from ..engine import Engine
from .access import Access, HTTPError

MAX_ALTERNATIVES = 8


def libre_alternatives(value: Any) -> int:
    """LibreTranslate's `alternatives`: an integer, or its digits as a form sends them; below 0 counts as 0."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,9}\s*", value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HTTPError(400, f"Invalid request: alternatives must be an integer, got {value!r}")
    if value > MAX_ALTERNATIVES:
        raise HTTPError(400, f"Invalid request: alternatives must be <= {MAX_ALTERNATIVES}, got {value}")
    return max(0, value)


def language_options(engine: Engine, source: str, target: str) -> dict[str, Any]:
    """LibreTranslate's source/target for this model: language codes of a multilingual model, or a check
    against the pair a bilingual model translates."""
    tok = engine.tokenizer
    if hasattr(tok, "lang_id"):  # multilingual: the codes select the languages
        return {"source_lang": None if source == "auto" else source, "target_lang": target}
    pair = getattr(tok, "language_pair", (None, None))
    if pair[0] is not None and source not in ("auto", pair[0]):
        raise HTTPError(400, f"this model translates {pair[0]} to {pair[1]}; source {source!r} is not available")
    if pair[1] is not None and target != pair[1]:
        raise HTTPError(400, f"this model translates {pair[0]} to {pair[1]}; target {target!r} is not available")
    return {}


def language_list(engine: Engine) -> list[dict[str, Any]]:
    """LibreTranslate's GET /languages."""
    tok = engine.tokenizer
    if hasattr(tok, "lang_ids"):
        codes = sorted(tok.lang_ids)
        return [{"code": c, "name": language_name(c), "targets": [t for t in codes if t != c]} for c in codes]
    source, target = getattr(tok, "language_pair", (None, None))
    if source is None or target is None:
        return []
    return [{"code": source, "name": language_name(source), "targets": [target]},
            {"code": target, "name": language_name(target), "targets": []}]


def frontend(engine: Engine, config: ServerConfig, access: Access) -> dict[str, Any]:
    """LibreTranslate's GET /frontend/settings (what its web page and clients read to set themselves up)."""
    langs = language_list(engine)
    target = next((t for row in langs for t in row["targets"]), None)
    return {"charLimit": config.max_chars, "frontendTimeout": 500, "apiKeys": access.keys_required,
            "keyRequired": access.keys_required, "suggestions": False, "filesTranslation": True,
            "supportedFilesFormat": list(FILE_TYPES),
            "language": {"source": {"code": "auto", "name": "Auto Detect"},
                         "target": {"code": target, "name": language_name(target) if target else None}}}
