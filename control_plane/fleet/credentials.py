"""Keep the broker's device credentials in step with enrolled devices.

Mosquitto: a `password_file` in mosquitto_passwd's format (PBKDF2-SHA512, `$7$` hashes), written
atomically under a file lock, then SIGHUP to the broker, which re-reads its password and ACL files
(see deploy/mosquitto/README.md for why not the dynamic security plugin). The embedded broker:
`InMemoryCredentials`, whose `check` is the broker's password callback.

The control plane keeps only hashes: it computes `mosquitto_hash(secret)` once, at enrollment,
where the secret is in hand, stores it with the device, and can then `sync` the whole file from
the database at any time (for example on start) without knowing a single secret.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

from shared.mqtt.errors import CredentialSyncError
from shared.topics import is_valid_device_id

PBKDF2_ITERATIONS = 101  # mosquitto_passwd 2.0's default; secrets are random, not human passwords
_SALT_BYTES = 12  # as mosquitto_passwd writes
_DK_BYTES = 64


def mosquitto_hash(secret: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """A `$7$` hash that Mosquitto 2's password_file accepts (mosquitto_passwd -H sha512-pbkdf2)."""
    salt = salt if salt is not None else os.urandom(_SALT_BYTES)
    derived = hashlib.pbkdf2_hmac("sha512", secret.encode("utf-8"), salt, iterations, _DK_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(derived).decode()}"


def verify_mosquitto_hash(secret: str, password_hash: str) -> bool:
    try:
        _, kind, iterations, salt_b64, derived_b64 = password_hash.split("$")
        if kind != "7":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(derived_b64)
        derived = hashlib.pbkdf2_hmac("sha512", secret.encode("utf-8"), salt, int(iterations), len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(derived, expected)


class BrokerCredentialSync(Protocol):
    """What the control plane calls when devices enroll or are removed."""

    def add_device(self, device_id: str, secret: str) -> str:
        """Allow `device_id` with `secret`; returns the stored hash (keep it for `sync`)."""
        ...

    def add_hash(self, device_id: str, password_hash: str) -> None:
        """Allow `device_id` with the secret behind a stored `mosquitto_hash`."""
        ...

    def remove_device(self, device_id: str) -> None: ...

    def read(self) -> dict[str, str]:
        """The device entries the broker knows now (device id -> hash)."""
        ...

    def reload(self) -> None:
        """Make the broker read the file again."""
        ...

    def sync(self, device_hashes: Mapping[str, str]) -> None:
        """Make the broker know exactly these devices (device id -> `mosquitto_hash`), plus admins."""
        ...


def client_id_for(label: str, secret: str | None) -> str:
    """The control plane's MQTT client id: `label` plus a tag only the holder of `secret` can compute.

    A broker hands a client id's session to whoever connects with it, so the control plane's ids
    must not be guessable; without a secret (an anonymous broker) there is nothing to bind to.
    """
    if not secret:
        return label
    tag = hmac.new(secret.encode("utf-8"), b"slmops mqtt client id\0" + label.encode("utf-8"), hashlib.sha256)
    return f"{label}-{tag.hexdigest()[:20]}"


def _check_device_id(device_id: str) -> None:
    if not is_valid_device_id(device_id):
        raise CredentialSyncError(f"device id {device_id!r} cannot be an MQTT username")


class InMemoryCredentials:
    """Credentials held in this process, for the embedded broker (`EmbeddedBroker(auth=creds.check)`)."""

    def __init__(self, admins: Mapping[str, str] | None = None) -> None:
        self._admins = {user: mosquitto_hash(secret) for user, secret in (admins or {}).items()}
        self._devices: dict[str, str] = {}
        self._lock = threading.Lock()

    def add_device(self, device_id: str, secret: str) -> str:
        password_hash = mosquitto_hash(secret)
        self.add_hash(device_id, password_hash)
        return password_hash

    def add_hash(self, device_id: str, password_hash: str) -> None:
        _check_device_id(device_id)
        with self._lock:
            self._devices[device_id] = password_hash

    def remove_device(self, device_id: str) -> None:
        with self._lock:
            self._devices.pop(device_id, None)

    def sync(self, device_hashes: Mapping[str, str]) -> None:
        for device_id in device_hashes:
            _check_device_id(device_id)
        with self._lock:
            self._devices = dict(device_hashes)

    def check(self, username: str, password: str) -> bool:
        with self._lock:
            password_hash = self._admins.get(username) or self._devices.get(username)
        return password_hash is not None and verify_mosquitto_hash(password, password_hash)


def signal_from_pid_file(pid_file: Path) -> Callable[[], None]:
    """A reload that sends SIGHUP to the broker whose pid is in `pid_file`.

    No pid file, or a stale one, means no broker is running: it reads the file when it starts.
    """

    def reload() -> None:
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (FileNotFoundError, ProcessLookupError):
            return
        except (OSError, ValueError) as exc:
            raise CredentialSyncError(f"cannot signal the broker from {pid_file}: {exc}") from exc

    return reload


class CredentialFile:
    """A broker's credential file kept in step with enrolled devices, the broker reloaded after
    each change. Subclasses say how a secret is hashed and an entry checked (`hash_secret`,
    `check_entry`) and how the file is read and written (`read`, `_write`)."""

    path: Path
    _reload: Callable[[], None] | None = None

    def hash_secret(self, secret: str) -> str:
        raise NotImplementedError

    def check_entry(self, device_id: str, password_hash: str) -> None:
        """Raise CredentialSyncError for an entry the broker must not be given."""
        _check_device_id(device_id)

    def read(self) -> dict[str, str]:
        raise NotImplementedError

    def _write(self, devices: Mapping[str, str]) -> None:
        raise NotImplementedError

    def add_device(self, device_id: str, secret: str) -> str:
        password_hash = self.hash_secret(secret)
        self.add_hash(device_id, password_hash)
        return password_hash

    def add_hash(self, device_id: str, password_hash: str) -> None:
        """Allow `device_id` with the secret behind `password_hash` (a stored `hash_secret`)."""
        self.check_entry(device_id, password_hash)
        with self._locked():
            entries = self.read()
            entries[device_id] = password_hash
            self._write(entries)
        self.reload()

    def remove_device(self, device_id: str) -> None:
        with self._locked():
            entries = self.read()
            if device_id not in entries:
                return
            self._forget(entries, [device_id])
            self._write(entries)
        self.reload()

    def sync(self, device_hashes: Mapping[str, str]) -> None:
        for device_id, password_hash in device_hashes.items():
            self.check_entry(device_id, password_hash)
        with self._locked():
            entries = self.read()
            self._forget(entries, [device_id for device_id in entries if device_id not in device_hashes])
            entries.update(device_hashes)
            self._write(entries)
        self.reload()

    def _forget(self, entries: dict[str, str], device_ids: list[str]) -> None:
        """Take these devices' credentials out of `entries`, what the broker is given next."""
        for device_id in device_ids:
            entries.pop(device_id, None)

    def reload(self) -> None:
        if self._reload is not None:
            self._reload()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Several control-plane replicas may share the file: serialise read-modify-write.
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            handle = open(lock_path, "a")  # noqa: SIM115 - held for the duration of the block
        except OSError as exc:
            raise CredentialSyncError(f"cannot lock {lock_path}: {exc}") from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield


class MosquittoPasswordFile(CredentialFile):
    """A mosquitto `password_file` kept in step with enrolled devices, reloaded after each change."""

    def __init__(
        self,
        path: str | Path,
        *,
        admins: Mapping[str, str] | None = None,
        reload: Callable[[], None] | None = None,
        pid_file: str | Path | None = None,
    ) -> None:
        """`admins`: user -> secret (the control plane); `reload` or `pid_file` says how to reload."""
        self.path = Path(path)
        self._admins = {user: mosquitto_hash(secret) for user, secret in (admins or {}).items()}
        if reload is None and pid_file is not None:
            reload = signal_from_pid_file(Path(pid_file))
        self._reload = reload

    def hash_secret(self, secret: str) -> str:
        return mosquitto_hash(secret)

    def read(self) -> dict[str, str]:
        """Current entries without the admins (they are always rewritten from the constructor)."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return {}
        entries = dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))
        return {user: h for user, h in entries.items() if user not in self._admins}

    def _write(self, devices: Mapping[str, str]) -> None:
        write_atomically(self.path, "".join(f"{user}:{h}\n" for user, h in {**devices, **self._admins}.items()))


def write_atomically(path: Path, body: str) -> None:
    """Write a sibling and rename it over `path`, keeping its permissions: a broker never reads a
    half-written file, and its user can still read the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        _copy_mode(path, Path(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CredentialSyncError(f"cannot write {path}: {exc}") from exc


def _copy_mode(existing: Path, replacement: Path) -> None:
    """Keep the old file's permissions so the broker's user can still read it."""
    try:
        os.chmod(replacement, existing.stat().st_mode & 0o777)
    except FileNotFoundError:
        os.chmod(replacement, 0o640)
