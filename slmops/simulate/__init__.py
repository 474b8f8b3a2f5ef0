"""`slmops simulate`: thousands of simulated agents in one asyncio process (see `agent` and `fleet`).

One event loop, one socket per device, no thread per device. Tests drive a handful of the same
agents from synchronous code through `tests/support/simulated.py`.
"""

from slmops.simulate.agent import Credential, SimAgent, SimConfig, SimStats
from slmops.simulate.fleet import SimFleet, enroll_fleet, load_credentials, raise_fd_limit, run, save_credentials

__all__ = [
    "Credential",
    "SimAgent",
    "SimConfig",
    "SimFleet",
    "SimStats",
    "enroll_fleet",
    "load_credentials",
    "raise_fd_limit",
    "run",
    "save_credentials",
]
