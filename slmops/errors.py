"""The root of every error the operator tools (`slmops`) raise: `except SlmopsError` catches any.

Error tree::

    SlmopsError
    ├── ApiError        a control-plane call failed; carries the problem's stable `code` (cli/client.py)
    ├── SampleError     a sample model could not be fetched, or its bytes are not the pinned ones
    ├── WireError       a simulated device's MQTT connection failed, was refused or was lost
    └── DemoStopped     a stop signal arrived: the demo unwinds and stops what it started
"""

from __future__ import annotations


class SlmopsError(Exception):
    """Base of every error from the `slmops` package."""
