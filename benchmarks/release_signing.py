"""Signed releases: what signing costs the control plane per rollout stage, signing on vs off side
by side in one run, and what verification costs a device per release.

  1. `RolloutController.assignments` for one stage of N devices (the desired states it writes,
     serialised for the wire), with the release signer configured and without;
  2. the bytes of one desired state on the wire, with and without its release and root chain;
  3. `ReleaseGuard.verify` on one desired state (a root walk of one rotation included)
     (target < 5 ms).

    .venv/bin/python benchmarks/release_signing.py --devices 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from control_plane.models import Artifact, Model, ModelVersion, Rollout  # noqa: E402
from control_plane.rollouts.controller import HardwareProfiles, RolloutController  # noqa: E402
from control_plane.rollouts.members import Member  # noqa: E402
from control_plane.trust import releases  # noqa: E402
from control_plane.trust.releases import ReleaseSigner  # noqa: E402
from edge_agent.trust import ReleaseGuard, TrustState  # noqa: E402
from shared.desired import ArtifactRef  # noqa: E402
from shared.messages import encode  # noqa: E402
from shared.signing import read_private_key  # noqa: E402
from tests.support.releases import Authority  # noqa: E402


def stage_seconds(devices: int) -> float:
    """Time to assign one stage of `devices` members and serialise their desired states."""
    model, version = Model(id="m", name="m"), ModelVersion(id="v", model_id="m", version="2.0")
    artifact = Artifact(id="a", version_id="v", sha256="a" * 64, size_bytes=5_000_000, format="gguf")
    profiles = HardwareProfiles()
    for i in range(devices):
        profiles.add(f"d{i}", '{"ram_mb": 4096, "arch": "x86_64"}')
    rollout = Rollout(id="r", model_id="m", version_id="v", stage_index=0)
    members = [Member(f"d{i}", -1, "waiting", None) for i in range(devices)]
    started = time.perf_counter()
    states, _ = RolloutController().assignments(rollout, members, model, version, ([artifact], None), profiles)
    for payload in states.values():
        orjson.dumps(payload)
    return time.perf_counter() - started


def verify_ms(repeats: int) -> tuple[float, int, int]:
    authority = Authority()
    pinned = authority.chain[0].signed
    authority.rotate()
    desired = authority.desired(ArtifactRef(sha256="a" * 64, size_bytes=5_000_000, format="gguf"))
    desired = desired.model_copy(update={"roots": authority.chain[1:]})  # as the control plane sends it
    guard = ReleaseGuard(Path(tempfile.mkdtemp()) / "trust.json", TrustState(root=pinned))
    started = time.perf_counter()
    for _ in range(repeats):
        guard.verify(desired)
    per = (time.perf_counter() - started) / repeats * 1000
    bare = desired.model_copy(update={"release": None, "roots": []})
    return per, len(encode(bare)), len(encode(desired))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as keys:
        releases.init_keys(Path(keys))
        signer = ReleaseSigner(
            read_private_key(Path(keys) / releases.RELEASE_KEY_FILE),
            releases.read_root_chain(Path(keys) / releases.ROOT_FILE),
            expiry_s=7 * 86400,
        )
    off, on = [], []
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both sides
        releases.configure(None)
        off.append(stage_seconds(args.devices))
        releases.configure(signer)
        signer.forget()  # each stage signs anew
        on.append(stage_seconds(args.devices))
    releases.configure(None)
    off_s, on_s = statistics.median(off), statistics.median(on)
    per, bare, signed = verify_ms(200)
    print(f"one stage of {args.devices} devices, assignments + wire JSON (median of {args.repeats}):")
    print(f"  signing off {off_s * 1000:8.1f} ms   signing on {on_s * 1000:8.1f} ms   ratio {on_s / off_s:.2f}")
    print(f"desired state on the wire: {bare} bytes unsigned, {signed} bytes with its release and one root rotation")
    print(f"device verification per release (one root rotation walked): {per:.2f} ms (target < 5 ms)")


if __name__ == "__main__":
    main()
