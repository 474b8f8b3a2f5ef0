"""Recognise redelivered QoS 1 messages by id (MQTT 3.1.1 section 4.3.2: at least once)."""

from __future__ import annotations

import threading
from collections import OrderedDict


class RecentIds:
    """A bounded LRU of recently seen message ids; thread-safe."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, message_id: str) -> bool:
        """Record `message_id`; True the first time it is seen within the window, else False."""
        with self._lock:
            if message_id in self._seen:
                self._seen.move_to_end(message_id)
                return False
            self._seen[message_id] = None
            if len(self._seen) > self._capacity:
                self._seen.popitem(last=False)
            return True

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._seen

    def forget(self, message_id: str) -> None:
        """Let `message_id` count as new again (its message was handed back for redelivery)."""
        with self._lock:
            self._seen.pop(message_id, None)
