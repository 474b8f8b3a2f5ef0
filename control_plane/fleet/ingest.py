"""Writes device messages from MQTT into SQL, one transaction per batch.

Status moves devices online/offline; state updates what they run and which desired message they
acted on; telemetry windows are stored once per (device, message id); events are kept as they come.
A device that comes online without having acted on its desired state gets it published again.
Messages from devices the registry does not know, or that hold no live credential, are counted
and dropped.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa
from sqlmodel import Session

from control_plane import metrics
from control_plane.db import bulk
from control_plane.models import (
    DesiredStateRow,
    Device,
    DeviceEvent,
    DeviceStatus,
    TelemetryRecord,
    as_utc,
    new_id,
    utcnow,
)
from shared.mqtt.errors import UnstorableBatch
from shared.topics import TopicKind

log = logging.getLogger("slmops.ingest")


LAST_SEEN_RESOLUTION = timedelta(seconds=15)
_DEVICES = Device.__table__  # type: ignore[attr-defined]
_WINDOWS = TelemetryRecord.__table__  # type: ignore[attr-defined]
_EVENTS = DeviceEvent.__table__  # type: ignore[attr-defined]
_DESIRED = DesiredStateRow.__table__  # type: ignore[attr-defined]
# A device waiting for a (reissued) enrollment token or decommissioned holds no live credential.
_WITHOUT_CREDENTIAL = frozenset({DeviceStatus.pending_enrollment, DeviceStatus.decommissioned})
# Ordered reports (shared.messages.Ordered): the columns each order column guards.
_ORDERED = {
    "state_seq": ("phase", "phase_reason", "acked_message_id", "current_model", "current_version", "current_sha256",
                  "previous_version"),
    "status_seq": ("status", "hardware"),
}  # fmt: skip
_ACKED_ID_CHARS = _DEVICES.c.acked_message_id.type.length
# Errors a value in the batch causes, which no retry fixes (COPY raises psycopg's own, not wrapped).
_VALUE_ERRORS = (sa.exc.DataError, sa.exc.IntegrityError, psycopg.DataError, psycopg.IntegrityError,
                 OverflowError, UnicodeError, orjson.JSONEncodeError)  # fmt: skip


class IngestWriter:
    """Plain rows in, plain statements out: per message, a dict of column values and no ORM object.

    A Device object per sender and the unit of work's per-row flush would cost more than decoding
    the messages (ADR 0006).
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.counters: Counter[str] = Counter()

    def __call__(self, batch: list[Any]) -> None:
        """The subscriber's batch handler (on its network or flusher thread); one transaction per
        batch. A value the database refuses raises `UnstorableBatch`: the subscriber then stores
        the batch in parts at once, so the message costs only itself."""
        try:
            self._write(batch)
        except _VALUE_ERRORS as exc:
            raise UnstorableBatch(f"{type(exc).__name__}: {str(exc)[:200]}") from exc

    def _write(self, batch: list[Any]) -> None:
        now = utcnow()  # the batch's write time: one clock read, not one per window
        with Session(self.engine) as session:
            statuses, last_seen = self._statuses(session, {m.device_id for m in batch})
            changes: dict[str, dict[str, Any]] = {}  # device id -> columns to set, latest message wins
            windows: dict[tuple[str, str], dict[str, Any]] = {}
            events: list[dict[str, Any]] = []
            for message in batch:
                status = statuses.get(message.device_id)
                if status is None or status in _WITHOUT_CREDENTIAL:
                    reason = "unknown_device" if status is None else "no_credential"
                    self.counters[reason] += 1
                    log.warning("dropped %s message from device %s (%s)", message.kind, message.device_id, reason)
                    continue
                change = changes.setdefault(message.device_id, {})
                change["last_seen"] = message.received_at
                self._apply(message, change, statuses, windows, events, now)
                self.counters[str(message.kind)] += 1
            if windows:
                self._insert_windows(session, list(windows.values()))
            if events:
                # Once per (device, message id): a replay of the ingest journal may bring some again.
                bulk.insert(session, _EVENTS, events, skip_conflicts_on=("device_id", "message_id"))
            self._update_devices(session, _drop_fresh_last_seen(changes, last_seen))
            births = [m.device_id for m in batch if m.kind == TopicKind.STATUS and m.message.status == "online"]
            if births:
                _publish_again_unacted(session, births)
            session.commit()

    @staticmethod
    def _statuses(session: Session, device_ids: set[str]) -> tuple[dict[str, str], dict[str, datetime | None]]:
        """Each known sender's status and when it was last seen."""
        found: dict[str, str] = {}
        seen: dict[str, datetime | None] = {}
        for clause in bulk.matching(session, _DEVICES.c.id, sorted(device_ids)):
            stmt = sa.select(_DEVICES.c.id, _DEVICES.c.status, _DEVICES.c.last_seen).where(clause)
            for device_id, status, last_seen in session.execute(stmt).all():
                found[device_id], seen[device_id] = status, as_utc(last_seen)
        return found, seen

    def _apply(
        self,
        message: Any,
        change: dict[str, Any],
        statuses: dict[str, str],
        windows: dict[tuple[str, str], dict[str, Any]],
        events: list[dict[str, Any]],
        now: datetime,
    ) -> None:
        body = message.message
        device_id = message.device_id
        if message.kind == TopicKind.STATUS:
            rank = status_rank(body)
            if not _newer(change, "status_seq", rank):
                return  # an older report later in the batch
            change["status_seq"] = rank
            change["status"] = statuses[device_id] = (
                DeviceStatus.online if body.status == "online" else DeviceStatus.offline
            )
            if body.hardware is not None:
                change["hardware"] = body.hardware.model_dump(exclude={"schema_version"})
        elif message.kind == TopicKind.STATE:
            if not _newer(change, "state_seq", body.report_seq):
                return
            change.update(state_values(body), state_seq=body.report_seq)
            # A device that reports state is connected; one that orders its reports says so itself
            # in its birth, which an older state stored late must not undo.
            if body.report_seq is None and statuses[device_id] != DeviceStatus.online:
                change["status"] = statuses[device_id] = DeviceStatus.online
                change["status_seq"] = None
        elif message.kind == TopicKind.TELEMETRY:
            key = (device_id, body.message_id)
            if key in windows:
                self.counters["duplicate_telemetry"] += 1
                return
            windows[key] = telemetry_values(device_id, body, received_at=now)
            metrics.observe_ingest_lag(body.window_end)
        elif message.kind == TopicKind.EVENTS:
            detail = body.model_dump(mode="json", exclude={"schema_version", "kind"})
            events.append(
                {"id": new_id(), "device_id": device_id, "message_id": body.message_id, "kind": body.kind,
                 "detail": detail, "created_at": now}
            )  # fmt: skip

    def _insert_windows(self, session: Session, rows: list[dict[str, Any]]) -> None:
        """Insert, skipping windows already stored (a redelivery after a restart): the unique
        (device_id, message_id, window_end) constraint decides, so no lookup query precedes the insert."""
        inserted = bulk.insert(session, _WINDOWS, rows, skip_conflicts_on=("device_id", "message_id", "window_end"))
        self.counters["duplicate_telemetry"] += len(rows) - inserted

    @staticmethod
    def _update_devices(session: Session, changes: dict[str, dict[str, Any]]) -> None:
        # One statement per shape of change (telemetry-only senders share "last_seen").
        by_shape: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for device_id, change in changes.items():
            by_shape.setdefault(tuple(sorted(change)), []).append({"id": device_id, **change})
        for rows in by_shape.values():
            bulk.update(session, _DEVICES, rows, key=("id",), newer=_ORDERED)


def status_rank(status: Any) -> int | None:
    """The order of a status report: its connection's seq, offline after online (see Ordered)."""
    seq = status.report_seq
    return None if seq is None else 2 * seq + (status.status == "offline")


def _newer(change: dict[str, Any], order: str, incoming: int | None) -> bool:
    """Whether a report ranked `incoming` replaces what `change` holds already (as bulk.update's
    `newer` decides against the stored row)."""
    held = change.get(order)
    return held is None or incoming is None or incoming > held


def _publish_again_unacted(session: Session, device_ids: list[str]) -> None:
    """Mark the desired states of these (re)connected devices unpublished where the device has
    not acted on them, so the publisher sends them again. A broker can lose a retained message
    for a device that reconnects while it fails over: NATS 2.9 serves retained messages from a
    per-node copy that a node being re-elected may not have caught up yet (deploy/nats/README.md)."""
    acted = sa.select(_DEVICES.c.acked_message_id).where(_DEVICES.c.id == _DESIRED.c.device_id).scalar_subquery()
    for clause in bulk.matching(session, _DESIRED.c.device_id, sorted(set(device_ids))):
        session.execute(
            sa.update(_DESIRED)
            .where(clause, _DESIRED.c.published_message_id == _DESIRED.c.message_id)
            .where(sa.or_(acted.is_(None), acted != _DESIRED.c.message_id))
            .values(published_message_id=None)
        )


def _drop_fresh_last_seen(
    changes: dict[str, dict[str, Any]], last_seen: dict[str, datetime | None]
) -> dict[str, dict[str, Any]]:
    """Leave out updates that would only move `last_seen` by less than LAST_SEEN_RESOLUTION.

    A telemetry window changes nothing else on its device; rewriting the device row for every
    window would double the database's write work at fleet scale, for a timestamp nobody reads to the
    second (online/offline comes from status messages)."""
    kept = {}
    for device_id, change in changes.items():
        before = last_seen.get(device_id)
        if change.keys() == {"last_seen"} and before is not None:
            if as_utc(change["last_seen"]) - before < LAST_SEEN_RESOLUTION:  # type: ignore[operator]
                continue
        kept[device_id] = change
    return kept


def state_values(state: Any) -> dict[str, Any]:
    """The `devices` columns a reported state sets."""
    values: dict[str, Any] = {"phase": state.phase, "phase_reason": state.reason}
    # Longer than the column: not an id this control plane sent (a desired state from a file).
    if state.desired_message_id and len(state.desired_message_id) <= _ACKED_ID_CHARS:
        values["acked_message_id"] = state.desired_message_id
    current = state.current
    values["current_model"] = current.model if current else None
    values["current_version"] = current.version if current else None
    values["current_sha256"] = current.sha256 if current else None
    values["previous_version"] = state.previous.version if state.previous else None
    return values


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def telemetry_values(device_id: str, window: Any, received_at: datetime | None = None) -> dict[str, Any]:
    """A `telemetry_windows` row for one window, every column given (no model defaults apply)."""
    hist = window.latency_histogram
    return {
        "id": secrets.token_hex(16),  # random like new_id(), without building a uuid.UUID per window
        "device_id": device_id,
        "message_id": window.message_id,
        "seq": window.seq,
        "window_start": window.window_start,
        "window_end": window.window_end,
        "model": window.model,
        "version": window.version,
        "requests": window.requests,
        "errors": window.errors,
        "latency_p50_ms": _ms(window.latency_s.p50),
        "latency_p95_ms": _ms(window.latency_s.p95),
        "latency_p99_ms": _ms(window.latency_s.p99),
        "latency_max_ms": _ms(window.latency_s.max),
        "ttft_p95_ms": _ms(window.time_to_first_token_s.p95),
        "tokens_per_s_p50": window.tokens_per_s.p50,
        "rss_bytes": window.system.rss_bytes,
        "peak_rss_bytes": window.system.peak_rss_bytes,
        "latency_histogram": {"bounds": list(hist.bounds), "counts": list(hist.counts)} if hist else {},
        "received_at": received_at or utcnow(),
    }
