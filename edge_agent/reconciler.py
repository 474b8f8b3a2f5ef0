"""The reconcile state machine: desired state in, downloaded + activated model and durable state out.

Every step persists the state before it acts, so a restart after kill -9 knows where it stopped:

    idle/committed --desired--> downloading --> activating --> on_trial --> committed
                                     |               |              |
                              download_failed  activation_failed  rolled_back
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from edge_agent import failpoints
from edge_agent.activation import Activator
from edge_agent.errors import ActivationError, DownloadError, RollbackError
from edge_agent.serving import ModelSlot
from edge_agent.settings import AgentSettings
from edge_agent.statefile import AgentState, StateFile
from edge_agent.store import ModelStore
from edge_agent.trust import ReleaseGuard, release_of
from shared.desired import ArtifactRef, DesiredState
from shared.signing import RefusalReason, ReleaseRefused

log = logging.getLogger(__name__)


class ArtifactFetcher(Protocol):
    def fetch(
        self, artifact: ArtifactRef, url: str, *, protected: tuple[str, ...] = (), with_auth: bool = True
    ) -> Path: ...


UrlFor = Callable[[ArtifactRef], tuple[str, bool]]  # (absolute URL, send the device credential?)
# (event kind, the desired state it is about, message, detail): refusals and stale releases.
OnEvent = Callable[[str, DesiredState, str, dict[str, object]], None]
VERIFIED = "release_verified"  # the device's record that it checked the release it acts on
REFUSED = "release_refused"  # the reason's prefix when a desired state failed release verification
# Download failures that are the artifact server's attack on a signed release, by refusal reason.
_ARTIFACT_ATTACKS: dict[str, RefusalReason] = {"size_exceeded": "size_exceeded", "integrity_check_failed": "mismatch"}


class Reconciler:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        store: ModelStore,
        state_file: StateFile,
        slot: ModelSlot,
        activator: Activator,
        downloader: ArtifactFetcher,
        url_for: UrlFor,
        on_change: Callable[[AgentState], None],
        on_swap: Callable[[str], None] = lambda outcome: None,
        on_event: OnEvent = lambda kind, desired, message, detail: None,
        guard: ReleaseGuard | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.state_file = state_file
        self.slot = slot
        self.activator = activator
        self.downloader = downloader
        self.url_for = url_for
        self.on_change = on_change
        self.on_swap = on_swap
        self.on_event = on_event
        self.guard = guard  # None: releases are not verified (no root to trust)
        self._stale_serial: int | None = None  # the expired release already reported
        self.state = AgentState()

    def _save(self, **changes: object) -> None:
        self.state = self.state.model_copy(update=changes)
        self.state_file.save(self.state)
        self.on_change(self.state)

    # -- start-up ---------------------------------------------------------------------------------

    def recover(self) -> None:
        """Serve exactly one verified model after a (possibly unclean) stop, then resume pending work."""
        self.state = self.state_file.load()
        state = self.state
        pending = state.pending
        if pending is not None and state.phase == "activating":
            if state.activation_attempts >= self.settings.max_activation_attempts:
                reason = f"agent stopped {state.activation_attempts} times while activating {pending.version}"
                self._save(phase="activation_failed", reason=reason, pending=None, activation_attempts=0)
                pending = None
        self._serve_verified()
        if pending is not None and self.state.pending is not None:
            log.info("resuming %s of %s %s", self.state.phase, pending.model, pending.version)
            self._reconcile(pending)

    def _serve_verified(self) -> None:
        state = self.state
        # `previous` is the fallback for a current model that fails; with no current model (none
        # yet, or withdrawn by the control plane) there is nothing to serve.
        for candidate in (state.current, state.previous) if state.current is not None else ():
            if candidate is None:
                continue
            if not self._verified(candidate):
                log.error("model %s %s failed verification at start", candidate.model, candidate.version)
                continue
            try:
                self.activator.activate(candidate)
            except ActivationError as exc:
                log.error("model %s %s does not load at start: %s", candidate.model, candidate.version, exc)
                continue
            if candidate is not state.current:
                reason = "the current model failed verification or loading at start"
                self._save(current=candidate, previous=None, phase="rolled_back", reason=reason)
            else:
                self._save()
            return
        if state.current is not None:
            self._save(current=None, previous=None, phase="idle", reason="no verified model to serve")

    def _verified(self, spec: DesiredState) -> bool:
        if not self.store.verify(spec.artifact.sha256):
            return False
        return spec.adapter is None or self.store.verify(spec.adapter.sha256)

    # -- desired state ----------------------------------------------------------------------------

    def apply(self, desired: DesiredState) -> None:
        state = self.state
        # A failed download may be retried by sending the same message again (it is transient).
        if desired.message_id == state.desired_message_id and state.phase != "download_failed":
            log.info("desired state %s already handled; ignoring the duplicate", desired.message_id)
            return
        if not self._trusted(desired):
            return
        if desired.unload:
            self._unload(desired)
            return
        current = state.current
        if current is not None and _same_model(current, desired):
            # Already serving it (e.g. the fleet rolled back to what this device rolled back to).
            phase = "on_trial" if state.phase == "on_trial" else "committed"
            self._save(desired_message_id=desired.message_id, current=desired, phase=phase, reason=None)
            return
        self._save(
            pending=desired,
            desired_message_id=desired.message_id,
            phase="downloading",
            reason=None,
            activation_attempts=0,
        )
        self._reconcile(desired)

    def _trusted(self, desired: DesiredState, *, report: bool = True) -> bool:
        """Verify the release before anything is downloaded, changed or activated; a refusal keeps
        what is served as it is and is reported with its reason, a success once (`report`)."""
        if self.guard is None:
            return True
        try:
            verified = self.guard.verify(desired)
        except ReleaseRefused as exc:
            self._refuse(desired, exc.reason, str(exc))
            return False
        self.guard.accept(verified)
        if not report:
            return True
        release, root_version = verified.release, verified.root.version
        message = f"release {release.serial} of {release.model} {release.version} verified under root {root_version}"
        self.on_event(VERIFIED, desired, message, {"serial": release.serial, "root_version": root_version})
        return True

    def _refuse(self, desired: DesiredState, reason: RefusalReason, message: str) -> None:
        log.error("refused %s %s (%s): %s", desired.model, desired.version, desired.message_id, message)
        self.on_event(REFUSED, desired, message, {"reason": reason})
        self._save(desired_message_id=desired.message_id, phase="download_failed", reason=f"{REFUSED}: {message}",
                   pending=None, activation_attempts=0)  # fmt: skip

    def check_freshness(self, *, now: datetime | None = None) -> None:
        """Report once when the served release has expired and nothing newer came (keep serving it)."""
        current = self.state.current
        release = release_of(current) if self.guard is not None and current is not None else None
        if current is None or release is None or release.serial == self._stale_serial:
            return
        if release.expires > (now or datetime.now(UTC)):
            return
        self._stale_serial = release.serial
        message = f"release {release.serial} of {release.model} {release.version} expired at {release.expires}"
        log.warning("stale release: %s; still serving it", message)
        self.on_event("stale_release", current, message, {"reason": "expired", "serial": release.serial})
        self._save(reason=f"stale_release: {message}")

    def _unload(self, desired: DesiredState) -> None:
        """Serve nothing (the control plane withdrew the model from a device that ran nothing
        before). The withdrawn model stays `previous`, its files kept, so going forward again
        needs no download; a restart serves nothing (see _serve_verified)."""
        reason = desired.withdrawal_reason()
        current = self.state.current
        if current is not None:
            log.warning("unloading %s %s: withdrawn by the control plane", current.model, current.version)
            self.slot.take_offline(reason)
            self.on_swap("unloaded")
        previous = current if current is not None else self.state.previous
        self._save(
            desired_message_id=desired.message_id,
            current=None,
            previous=previous,
            pending=None,
            phase="idle",
            reason=reason,
            activation_attempts=0,
        )

    def _reconcile(self, desired: DesiredState) -> None:
        try:
            self._download(desired)
        except DownloadError as exc:
            log.error("download of %s %s failed: %s", desired.model, desired.version, exc)
            # A superseded download keeps its partial file: the same artifact may come back.
            if (attack := _ARTIFACT_ATTACKS.get(exc.code)) is not None:
                self.on_event(REFUSED, desired, str(exc), {"reason": attack, "code": exc.code})
            self._save(phase="download_failed", reason=f"{exc.code}: {exc}", pending=None)
            return
        if not self._trusted(desired, report=False):  # again: it may have expired, or its key been revoked
            return
        self._save(phase="activating", activation_attempts=self.state.activation_attempts + 1)
        failpoints.reached("activation_started")
        try:
            self.activator.activate(desired)
        except ActivationError as exc:
            log.error("activation of %s %s failed: %s", desired.model, desired.version, exc)
            self.on_swap("failed")
            self._save(phase="activation_failed", reason=f"{exc.code}: {exc}", pending=None, activation_attempts=0)
            return
        failpoints.reached("activation_loaded")  # serving the new model while the state names the old
        log.info("serving %s %s (%s swap); on trial", desired.model, desired.version, self.activator.last_swap_mode)
        self.on_swap("activated")
        # On trial: the model answers its golden set on this device's runtime, reported with the result.
        golden = self.activator.run_golden(desired.version, desired.golden) if desired.golden else None
        previous = self.state.current
        reason = None
        if self.activator.last_swap_mode == "unload_first":
            reason = (
                "not enough memory for both models: swapped with "
                f"{self.activator.last_unavailable_s:.2f} s of unavailability"
            )
        self._save(
            current=desired,
            previous=previous if previous is None or not _same_model(previous, desired) else self.state.previous,
            pending=None,
            phase="on_trial",
            reason=reason,
            activation_attempts=0,
            trial_started_at=time.time(),
            golden=golden,
        )
        failpoints.reached("trial_started")
        self.store.prune(self._protected())

    def _download(self, desired: DesiredState) -> None:
        protected = self._protected()
        for artifact in filter(None, (desired.artifact, desired.adapter)):
            url, with_auth = self.url_for(artifact)
            self.downloader.fetch(artifact, url, protected=protected, with_auth=with_auth)
            protected = protected + (artifact.sha256,)
            try:
                self.store.model_path(artifact)  # unpacks a folder bundle, from its verified blob
            except Exception as exc:  # BundleError, tarfile's and the disk's errors
                raise DownloadError(f"unpacking {artifact.sha256[:12]} failed: {exc}", code="unpack_failed") from exc

    def _protected(self) -> tuple[str, ...]:
        shas: list[str] = []
        for spec in (self.state.current, self.state.previous, self.state.pending):
            if spec is not None:
                shas.append(spec.artifact.sha256)
                if spec.adapter is not None:
                    shas.append(spec.adapter.sha256)
        return tuple(shas)

    def paths_for(self, spec: DesiredState) -> tuple[Path, Path | None]:
        adapter = self.store.model_path(spec.adapter) if spec.adapter else None
        return self.store.model_path(spec.artifact), adapter

    # -- trial and rollback -----------------------------------------------------------------------

    def check_trial(self) -> None:
        state = self.state
        serving = self.slot.current
        if state.phase != "on_trial" or serving is None or state.current is None:
            return
        if serving.spec.message_id != state.current.message_id:
            return
        s = self.settings
        if serving.errors >= s.trial_max_errors:
            reason = f"trial failed: {serving.errors} errors in {serving.requests} requests"
            try:
                self.rollback(reason=reason)
            except RollbackError as exc:
                log.error("%s, and rollback is not possible: %s", reason, exc)
            return
        on_trial_s = time.time() - (state.trial_started_at or time.time())
        if serving.requests >= s.trial_requests or on_trial_s >= s.trial_seconds:
            log.info(
                "committing %s %s after %d requests",
                state.current.model,
                state.current.version,
                serving.requests,
            )
            self._save(phase="committed", reason=None)

    def rollback(self, *, reason: str) -> None:
        """Return to the previous verified model now; raises RollbackError if there is none."""
        target, failed = self.state.previous, self.state.current
        if target is None:
            raise RollbackError("there is no previous model to roll back to")
        if not self._verified(target):
            raise RollbackError(f"previous model {target.version} failed verification")
        try:
            self.activator.activate(target)
        except ActivationError as exc:
            raise RollbackError(f"previous model {target.version} does not load: {exc}") from exc
        log.warning("rolled back to %s %s: %s", target.model, target.version, reason)
        self.on_swap("rolled_back")
        # The rolled-back model stays as `previous` so an operator can still go forward again.
        self._save(current=target, previous=failed, pending=None, phase="rolled_back", reason=reason)


def _same_model(a: DesiredState, b: DesiredState) -> bool:
    return (
        a.artifact.sha256 == b.artifact.sha256
        and (a.adapter.sha256 if a.adapter else None) == (b.adapter.sha256 if b.adapter else None)
        and a.runtime == b.runtime
    )
