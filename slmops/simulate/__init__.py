"""`slmops simulate`: thousands of simulated agents in one asyncio process (see `agent` and `fleet`).

The thread-per-device `slmops.simulator.SimDevice` suits a handful of devices in a test; this
package scales to a fleet (one event loop, one socket per device, no thread per device).
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
