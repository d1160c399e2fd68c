"""Who changed a source's references, and when (issues 19 and 23): every add and remove through the API, the CLI or
the daemon itself (`[mutual] auto_accept`) is one JSON line in `<[storage].dir>/references/history.jsonl` and a log
line, read back newest first by `GET /api/sources/{id}/references/history` and the UI.

A line: `{"at", "source", "action": "added"|"removed", "names", "inspection_ids", "by"}`; `by` is
`api:<token name>`, `cli:<user>` or `daemon:auto_accept`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapters.timeutil import rfc3339, utc_now

log = logging.getLogger("anomalyd.references")
_lock = threading.Lock()


def history_path(settings: Any) -> Path:
    """`<[storage].dir>/references/history.jsonl` (beside the managed per-source folders)."""
    return settings.resolve(settings.storage.dir) / "references" / "history.jsonl"


def record(settings: Any, source_id: str, action: str, names: Sequence[str], by: str,
           inspection_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Append one change (and log it); returns the line written."""
    entry = {"at": rfc3339(utc_now()), "source": source_id, "action": action, "names": list(names),
             "inspection_ids": [int(i) for i in inspection_ids], "by": by}
    path = history_path(settings)
    with _lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
    log.warning("source %s: references %s by %s: %s", source_id, action, by, ", ".join(names))
    return entry


def history(settings: Any, source_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """The source's changes, newest first (an unreadable line is skipped with a warning, never an error)."""
    path = history_path(settings)
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            log.warning("%s line %d is not JSON; skipped", path, number)
            continue
        if isinstance(entry, dict) and entry.get("source") == source_id:
            entries.append(entry)
    return entries[::-1][:limit]
