"""Release and root metadata: signatures, expiry, serials, mix-and-match and root rotation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.canonical import CanonicalJSONError, canonical_json
from shared.desired import ArtifactRef
from shared.releases import check_desired, update_root, verify_release
from shared.signing import MAX_SIGNED_BYTES, ReleaseRefused, SignedMetadata, sign
from tests.support.releases import Authority, past

A = ArtifactRef(sha256="a" * 64, size_bytes=100, format="gguf")
B = ArtifactRef(sha256="b" * 64, size_bytes=200, format="gguf")


def now() -> datetime:
    return datetime.now(UTC)


def refused(reason: str) -> pytest.RaisesExc[ReleaseRefused]:
    return pytest.raises(ReleaseRefused, match=f"^{reason}:")


def test_canonical_json_is_sorted_compact_utf8_and_refuses_floats() -> None:
    assert canonical_json({"b": 1, "a": ["é", None, True]}) == '{"a":["é",null,true],"b":1}'.encode()
    with pytest.raises(CanonicalJSONError):
        canonical_json({"x": 1.5})


def test_a_release_signed_by_the_release_key_verifies() -> None:
    authority = Authority()
    release = verify_release(authority.root, authority.release([A]), now=now(), highest_serial=None)
    assert (release.model, release.serial, release.artifacts[0].sha256) == ("m", 1, A.sha256)


def test_a_tampered_release_is_a_bad_signature() -> None:
    authority = Authority()
    meta = authority.release([A])
    forged = SignedMetadata(signed={**meta.signed, "artifacts": [B.model_dump(exclude={"schema_version"})]},
                            signatures=meta.signatures)  # fmt: skip
    with refused("bad_signature"):
        verify_release(authority.root, forged, now=now(), highest_serial=None)


def test_a_release_signed_by_another_key_is_an_unknown_key() -> None:
    authority = Authority()
    with refused("unknown_key"):
        verify_release(authority.root, authority.release([A], key=Ed25519PrivateKey.generate()), now=now(),
                       highest_serial=None)  # fmt: skip


def test_the_root_key_alone_may_not_sign_releases() -> None:
    authority = Authority()
    with refused("unknown_key"):
        verify_release(authority.root, authority.release([A], key=authority.root_key), now=now(), highest_serial=None)


def test_an_expired_release_is_refused() -> None:
    authority = Authority()
    with refused("expired"):
        verify_release(authority.root, authority.release([A], expires=past()), now=now(), highest_serial=None)


def test_a_lower_serial_is_a_rollback_and_the_same_serial_is_accepted() -> None:
    authority = Authority()
    meta = authority.release([A], serial=5)
    assert verify_release(authority.root, meta, now=now(), highest_serial=5).serial == 5
    with refused("rollback"):
        verify_release(authority.root, meta, now=now(), highest_serial=6)


def test_an_oversized_release_is_refused_before_it_is_parsed() -> None:
    authority = Authority()
    meta = authority.release([A])
    padded = sign({**meta.signed, "pad": "x" * MAX_SIGNED_BYTES}, [authority.release_key])
    with refused("size_exceeded"):
        verify_release(authority.root, padded, now=now(), highest_serial=None)


def test_a_desired_state_naming_an_artifact_outside_its_release_is_a_mismatch() -> None:
    authority = Authority()
    desired = authority.desired(A)
    check_desired(verify_release(authority.root, desired.release, now=now(), highest_serial=None), desired)
    other_model = authority.desired(B, model="other")
    mixed = desired.model_copy(update={"artifact": B})
    renamed = desired.model_copy(update={"model": "other"})
    unloading = desired.model_copy(update={"unload": True})
    for bad in (mixed, renamed, unloading):
        with refused("mismatch"):
            check_desired(verify_release(authority.root, desired.release, now=now(), highest_serial=None), bad)
    with refused("mismatch"):  # model A's state under model B's (valid) release
        check_desired(verify_release(authority.root, other_model.release, now=now(), highest_serial=None), desired)


def test_root_rotation_is_followed_and_revokes_the_old_release_key() -> None:
    authority = Authority()
    pinned = authority.root
    old_release_key = authority.release_key
    authority.rotate(root_key=Ed25519PrivateKey.generate())
    authority.rotate()
    root = update_root(pinned, authority.chain, now=now())
    assert root.version == 3
    assert verify_release(root, authority.release([A]), now=now(), highest_serial=None).serial >= 1
    with refused("unknown_key"):
        verify_release(root, authority.release([A], key=old_release_key), now=now(), highest_serial=None)


def test_a_root_not_signed_by_the_previous_root_is_refused() -> None:
    authority = Authority()
    pinned = authority.root
    intruder = Ed25519PrivateKey.generate()
    authority.rotate(root_key=intruder)
    forged = sign(authority.chain[-1].signed, [intruder])  # the new key only
    with refused("unknown_key"):
        update_root(pinned, [authority.chain[0], forged], now=now())


def test_an_expired_root_freezes_everything() -> None:
    authority = Authority()
    with refused("expired"):
        update_root(authority.root, authority.chain, now=now() + timedelta(days=400))
