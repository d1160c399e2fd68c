"""`[mutual] auto_accept` (issue 23): a zero-label source (`references = "auto"`) approves its own proposal.

Once `propose_after` of its judged frames looked normal, the daemon takes the `propose_count` frames that
`daemon.zero_label.start.propose_references` proposes (the lower-scoring half, spread over time) as the source's
references, exactly as an operator's approval would (`daemon.references.admin.add_references`); the reference
manager then switches the source to PatchCore on them and calibrates. The approval is recorded as
`daemon:auto_accept` (daemon/references/history.py) and logged. Off by default: an operator who looks at the proposal
first (UI, API, CLI) catches a defective frame the window judged normal.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("anomalyd.references")

AUTO_ACCEPT_BY = "daemon:auto_accept"


def accept_proposal(settings: Any, sessions: Any, store: Any, source_id: str) -> list[str]:
    """Approve the source's proposal when it is ready; the names added (empty: not ready yet)."""
    from daemon.references.admin import add_references
    from daemon.zero_label.start import propose_references

    mutual = settings.mutual
    proposal = propose_references(sessions, source_id, mutual.propose_count, min_judged=mutual.propose_after)
    if not proposal["ready"]:
        return []
    ids = [frame["inspection_id"] for frame in proposal["frames"]]
    added, _ = add_references(settings, sessions, store, source_id, ids, by=AUTO_ACCEPT_BY)
    log.warning("source %s: [mutual] auto_accept approved %d proposed frames as references (inspections %s); the "
                "source switches to PatchCore on them", source_id, len(added), ", ".join(map(str, ids)))
    return [item["name"] for item in added]
