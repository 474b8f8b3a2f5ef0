"""A control-plane ingest replica in its own process, for the kill -9 test: JetStreamIngest feeding
IngestWriter on the given database.

    python -m tests.support.jetstream_replica DATABASE_URL NATS_URL PREFIX MARKER [--hang-after N]

It writes "ready" to MARKER once it fetches; with --hang-after N, once its N-th batch has committed
it writes "hung <messages stored> <messages acknowledged>" and blocks forever before acknowledging it (so a kill leaves
committed and fetched-but-unstored messages unacknowledged).
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

from control_plane import db
from control_plane.fleet.ingest import IngestWriter
from control_plane.fleet.jetstream import JetStreamIngest
from shared.topics import Topics


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("database_url", "nats_url", "prefix", "marker"):
        parser.add_argument(name)
    parser.add_argument("--hang-after", type=int, default=0)
    parser.add_argument("--ack-wait", type=float, default=2.0)
    args = parser.parse_args()
    marker = Path(args.marker)
    writer = IngestWriter(db.make_engine(args.database_url))
    stored = [0, 0, 0]  # batches, messages, messages before the last batch (acknowledged)

    def handler(batch: list[Any]) -> None:
        writer(batch)
        stored[0] += 1
        stored[1], stored[2] = stored[1] + len(batch), stored[1]
        if stored[0] == args.hang_after:
            marker.write_text(f"hung {stored[1]} {stored[2]}")
            threading.Event().wait()  # committed, never acknowledged

    ingest = JetStreamIngest([args.nats_url], Topics(args.prefix), handler, max_batch=50, max_write=50,
                             ack_wait_s=args.ack_wait, name="replica-under-test")  # fmt: skip
    ingest.start()
    marker.write_text("ready")
    threading.Event().wait()


if __name__ == "__main__":
    main()
