"""`tagstream replay-dlq`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from consumer.cli import logs
from consumer.cli.options import Bootstrap, JsonOpt, emit_json, err


def replay_dlq_cmd(
    bootstrap_servers: Bootstrap = "127.0.0.1:9092",
    dlq_topic: Annotated[str, typer.Option(help="The dead-letter topic to read.")] = "uploads.dlq",
    to_topic: Annotated[
        str | None,
        typer.Option(help="Send here (default: each record's original topic)."),
    ] = None,
    id: Annotated[
        list[str] | None, typer.Option("--id", help="Only records with this key (repeatable).")
    ] = None,
    reason: Annotated[
        list[str] | None,
        typer.Option("--reason", help="Only this error reason, e.g. not_json (repeatable)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Stop after this many records.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Count what would be sent; send nothing.")] = False,
    follow: Annotated[
        bool,
        typer.Option(
            help="Keep reading new dead letters until Ctrl-C or SIGTERM. Dead letters of "
            "records that were themselves replays (header tagstream.replayed_from: the replay "
            "failed again) are skipped and counted, never re-sent in a loop; a later run "
            "without --follow replays them."
        ),
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Re-send chosen dead-letter records to their input topic (after a fix).

    Without --follow: one pass over the records there at start (up to each partition's high
    watermark then), so a replayed record that fails again while the service runs waits in
    the DLQ for the next run instead of looping. Dead letters whose value was truncated to fit
    the DLQ cannot be replayed: they are skipped and counted (skipped_truncated)."""
    import signal
    import threading

    from consumer.tools.dlq import replay_dlq

    logs.configure("warning")
    stop = threading.Event()
    restore: dict[signal.Signals, Any] = {}
    if follow:
        for sig in (signal.SIGINT, signal.SIGTERM):
            restore[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        rep = replay_dlq(
            bootstrap_servers,
            dlq_topic,
            to_topic=to_topic,
            ids=set(id) if id else None,
            reasons=set(reason) if reason else None,
            limit=limit,
            dry_run=dry_run,
            follow=follow,
            stop=stop,
        )
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
    verb = "would replay" if dry_run else "replayed"
    err.print(
        f"scanned {rep.scanned}, matched {rep.matched}, {verb} "
        f"{rep.matched if dry_run else rep.replayed}: {dict(rep.by_reason)} → {dict(rep.by_target)}"
        f"; skipped {rep.skipped_truncated} truncated"
        + (f", {rep.skipped_replayed} failed replays" if follow else "")
    )
    if json:
        emit_json(
            {
                "scanned": rep.scanned,
                "matched": rep.matched,
                "replayed": rep.replayed,
                "skipped_truncated": rep.skipped_truncated,
                "skipped_replayed": rep.skipped_replayed,
                "by_reason": dict(rep.by_reason),
                "by_target": dict(rep.by_target),
            }
        )
