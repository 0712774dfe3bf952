"""The judge's reply cache: judging is paid and slow, so a re-run must cost nothing.

Replies are keyed by ``sha256(model, prompt, image hashes)`` (:func:`.prompt.cache_key`), so an
entry can only ever answer for the very same question about the very same images.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from ...files import atomic_write_text


class ResponseCache:
    """Well-formed replies on disk, one small JSON file each, written atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        reply = data.get("reply") if isinstance(data, dict) else None
        return reply if isinstance(reply, str) else None

    def put(self, key: str, model: str, reply: str) -> None:
        record = {"key": key, "model": model, "reply": reply, "created": datetime.now(UTC).isoformat()}
        atomic_write_text(self._path(key), json.dumps(record, ensure_ascii=False))
