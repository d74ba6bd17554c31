"""Read the decisions topic from the beginning to its end (for `distill --from-topic`).

"Its end" is the high watermark of each partition as read at start: a running service keeps
recording decisions, and waiting for a quiet moment would never end on a busy topic.
"""

from __future__ import annotations

from typing import Any

import orjson

from consumer.tools.dlq import scan, scan_consumer


def read_decisions(
    bootstrap: str, topic: str, *, stall_s: float = 60.0, kafka: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every decision record up to the end seen at start, without joining a group (manual
    assignment, no commits); a later record for the same id wins. `stall_s` without a record
    or an end of partition raises (see `consumer.tools.dlq.scan`)."""
    c = scan_consumer(bootstrap, "tagstream-distill", kafka)
    try:
        by_id: dict[str, dict[str, Any]] = {}
        for m in scan(c, topic, stall_s=stall_s):
            try:
                rec = orjson.loads(m.value() or b"")
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                by_id[str(rec["id"])] = rec
        return list(by_id.values())
    finally:
        c.close()
