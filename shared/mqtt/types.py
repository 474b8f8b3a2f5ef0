"""Plain values the MQTT client takes and returns, and the asyncio handoff for handlers."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

Protocol = Literal["3.1.1", "5", "auto"]
Handler = Callable[[str, bytes], None]
AsyncHandler = Callable[[str, bytes], Coroutine[Any, Any, None]]
ConnectionListener = Callable[[bool], None]
Payload = bytes | str


@dataclass(frozen=True)
class Outgoing:
    """A message to publish; also the shape of the last will and the birth message."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass
class ClientCounters:
    connects: int = 0
    disconnects: int = 0
    messages_received: int = 0
    handler_errors: int = 0
    publish_failures: int = 0
    subscribe_failures: int = 0


@dataclass
class _Subscription:
    topic_filter: str
    qos: int
    handlers: list[Handler] = field(default_factory=list)


@dataclass
class _SubackWaiter:
    done: threading.Event = field(default_factory=threading.Event)
    granted: list[int | None] = field(default_factory=list)
    filters: list[tuple[str, int]] = field(default_factory=list)
    restore_attempt: int | None = None  # set on subscriptions restored after a connect


@dataclass
class SubscribeResult:
    """What the broker granted per filter: a QoS, or None where it refused (SUBACK 0x80 / >= 0x80)."""

    granted: dict[str, int | None]

    @property
    def all_granted(self) -> bool:
        return all(qos is not None for qos in self.granted.values())


def loop_handler(loop: asyncio.AbstractEventLoop, handler: AsyncHandler) -> Handler:
    """Adapt a coroutine handler so paho's thread hands each message to `loop` and returns at once."""

    def on_message(topic: str, payload: bytes) -> None:
        future: Future[None] = asyncio.run_coroutine_threadsafe(handler(topic, payload), loop)
        future.add_done_callback(lambda f: _log_failure(f, topic))

    return on_message


def _log_failure(future: Future[None], topic: str) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("async handler for %s failed", topic, exc_info=future.exception())
