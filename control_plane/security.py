"""Secrets: generation and hashing of API tokens, enrollment tokens and device secrets.

All three are 256-bit random values, not human passwords, so a single SHA-256 is enough to
make a stolen database useless and keeps per-request verification cheap (argon2 is for passwords).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

API_TOKEN_PREFIX = "slm_"
ENROLLMENT_TOKEN_PREFIX = "enr_"


def new_secret(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def verify_secret(secret: str, expected_hash: str | None) -> bool:
    if not expected_hash:
        return False
    return hmac.compare_digest(hash_secret(secret), expected_hash)
