"""The Agent: lifecycle (start, stop), one reconcile thread, and the surface the API and MQTT use.

Desired state arrives from any source through `submit_desired`; observers registered with
`subscribe` receive state changes, download progress and telemetry windows to publish.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from edge_agent.activation import Activator
from edge_agent.enroll import Credential, load_or_enroll
from edge_agent.errors import DownloadError
from edge_agent.metrics import AgentMetrics
from edge_agent.reconciler import Reconciler
from edge_agent.serving import ModelSlot, ServingModel
from edge_agent.settings import AgentSettings, ConfigError
from edge_agent.sources import DesiredStateSource
from edge_agent.statefile import AgentState, StateFile
from edge_agent.store import ModelStore
from edge_agent.telemetry import RequestRecord, SystemSampler, WindowAggregator
from edge_agent.tls import has_identity
from edge_agent.trust import ReleaseGuard
from edge_agent.windows import TelemetryWindows
from shared.desired import ArtifactRef, DesiredState
from shared.messages import EventKind, EventMessage
from shared.references import reference_problem, shown_reference
from shared.releases import parse_root_chain
from shared.signing import ReleaseRefused
from shared.state import DeviceState
from shared.telemetry import TelemetryWindow

if TYPE_CHECKING:
    import httpx

    from edge_agent.download import Downloader, Progress

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_TICK_S = 0.5
_RENEWAL_CHECK_S = 3600.0


@dataclass(frozen=True)
class AgentEvent:
    kind: Literal["state", "progress", "telemetry", "event"]
    payload: DeviceState | Progress | TelemetryWindow | EventMessage


Observer = Callable[[AgentEvent], None]
_Command = tuple[str, Any, "Future[None]"]


class Agent:
    def __init__(self, settings: AgentSettings, *, http_client: httpx.Client | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self._http = http_client
        self._downloader: Downloader | None = None
        self.metrics = AgentMetrics()
        self.slot = ModelSlot()
        self.store = ModelStore(
            settings.data_dir,
            keep_versions=settings.keep_versions,
            quota_bytes=settings.disk_quota_mb * MiB if settings.disk_quota_mb else None,
        )
        self.credential: Credential | None = None
        self._enrolled = False
        self.telemetry = WindowAggregator()
        self.windows = TelemetryWindows(
            self.telemetry,
            SystemSampler(settings.data_dir),
            window_s=settings.telemetry_window_s,
            serving=lambda: serving.spec if (serving := self.slot.current) else None,
            publish=self._publish_window,
        )
        self.last_window: TelemetryWindow | None = None
        self.last_progress: Progress | None = None
        self._observers: list[Observer] = []
        self._sources: list[DesiredStateSource] = []
        self._commands: queue.Queue[_Command] = queue.Queue()
        self._stopping = threading.Event()
        self._supersede = threading.Event()  # set when a newer command should cut a download short
        self._working_on: str | None = None  # message_id of the desired state being reconciled
        self._threads: list[threading.Thread] = []
        self.started = threading.Event()  # set once start-up recovery has finished
        self.identity_listeners: list[Callable[[], None]] = []  # called after a certificate renewal
        self.reconciler = self._build_reconciler()

    def _build_reconciler(self) -> Reconciler:
        s = self.settings
        activator = Activator(
            self.slot,
            lambda spec: self.reconciler.paths_for(spec),
            smoke_timeout_s=s.smoke_timeout_s,
            threads=s.threads,
            memory_budget_bytes=s.memory_budget_mb * MiB if s.memory_budget_mb else None,
        )
        return Reconciler(
            s,
            store=self.store,
            state_file=StateFile(s.state_path),
            slot=self.slot,
            activator=activator,
            downloader=self,
            url_for=self.artifact_url,
            on_change=self._on_state_change,
            on_swap=lambda outcome: self.metrics.swaps.labels(outcome).inc(),
            on_event=self._on_release_event,
        )

    # -- lifecycle --------------------------------------------------------------------------------

    def enroll(self) -> None:
        """Load the stored credential or enroll with the token; raises EnrollmentError."""
        s = self.settings
        token = s.enrollment_token.get_secret_value() if s.enrollment_token else None
        self.credential = load_or_enroll(
            lambda: self.http,
            path=s.credential_path,
            control_plane_url=s.control_plane_url,
            token=token,
            identity=(s.client_cert_path, s.client_key_path) if s.x509_identity else None,
        )
        if self.credential is not None:
            self.telemetry.device_id = self.credential.device_id
        self.reconciler.guard = self._release_guard()
        self._enrolled = True
        self.renew_identity_if_due()

    def renew_identity_if_due(self, *, force: bool = False) -> None:
        """Renew the X.509 certificate once two thirds of its life are gone (or, with `force`, now:
        a completed credential rotation revoked it); the old one serves meanwhile."""
        s, cred = self.settings, self.credential
        identity = (s.client_cert_path, s.client_key_path)
        base = s.control_plane_url or (cred.control_plane_url if cred else None)
        if not (s.x509_identity and cred and base and has_identity(*identity)):
            return
        from edge_agent.identity import renew, renewal_due

        if force or renewal_due(identity[0]):
            import httpx

            if renew(self.http, base, httpx.BasicAuth(cred.device_id, cred.device_secret), identity):
                for listener in self.identity_listeners:
                    listener()

    def _release_guard(self) -> ReleaseGuard | None:
        """The pinned root: provisioned in the config, else trusted on first use at enrollment."""
        s, credential = self.settings, self.credential
        try:
            pinned = parse_root_chain(s.root_metadata_file.read_bytes()) if s.root_metadata_file else None
            if pinned is None and credential is not None and credential.root_metadata:
                ReleaseGuard.pin_on_enrollment(s.trust_path, credential.root_metadata)
            guard = ReleaseGuard.load(s.trust_path, pinned=pinned)
        except (OSError, ValueError, ReleaseRefused) as exc:  # fail closed: no start without the root
            raise ConfigError(
                f"cannot establish the trusted root ({s.root_metadata_file or s.trust_path}): {exc}"
            ) from exc
        if guard is None:
            log.warning("no root to trust: desired states are applied without release verification")
        return guard

    def start(self) -> None:
        """Enroll if not done yet, then recover and reconcile on background threads."""
        if not self._enrolled:
            self.enroll()
        self._spawn(self._reconcile_loop, "reconcile")
        self._spawn(lambda: self.windows.run(self._stopping), "telemetry")
        if self.settings.x509_identity:
            self._spawn(self._renewal_loop, "identity")
        for source in self._sources:
            source.start(self.submit_desired)

    def _renewal_loop(self) -> None:
        while not self._stopping.wait(_RENEWAL_CHECK_S):
            try:
                self.renew_identity_if_due()
            except Exception:
                log.exception("certificate renewal check failed")

    def add_source(self, source: DesiredStateSource) -> None:
        self._sources.append(source)

    def stop(self) -> None:
        self._stopping.set()
        self._supersede.set()  # a running download stops at its next block; its partial file stays
        for source in self._sources:
            source.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        current = self.slot.current
        if current is not None:
            self.slot.take_offline("agent stopping", drain_timeout_s=5)
        if self._http is not None:
            self._http.close()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # httpx (with its TLS setup) is imported on first use: an idle agent stays smaller
    # (docs/performance.md#agent).
    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            import httpx

            # Redirects are followed (the control plane may send artifacts to a CDN); httpx drops the
            # Authorization header when a redirect leaves the control plane's origin. Downloads
            # follow them hop by hop under the rules of shared.references instead.
            timeout = httpx.Timeout(self.settings.download_timeout_s, connect=10.0)
            from edge_agent.tls import ssl_context

            verify = ssl_context(self.settings.ca_bundle)
            self._http = httpx.Client(timeout=timeout, follow_redirects=True, verify=verify)
        return self._http

    def use_credential(self, credential: Credential) -> None:
        """A rotated credential: new downloads authenticate with it (one under way keeps the old)."""
        self.credential = credential
        self._downloader = None

    @property
    def downloader(self) -> Downloader:
        if self._downloader is None:
            import httpx

            from edge_agent.download import Downloader

            s, cred = self.settings, self.credential
            self._downloader = Downloader(
                self.store,
                client=self.http,
                auth=httpx.BasicAuth(cred.device_id, cred.device_secret) if cred else None,
                retries=s.download_retries,
                backoff_s=s.download_backoff_s,
                backoff_max_s=s.download_backoff_max_s,
                on_progress=self._on_progress,
                on_bytes=self.metrics.download_bytes.inc,
                # A newer desired state or a rollback should not wait for a long download.
                superseded=self._supersede.is_set,
                redirect_allowed_hosts=tuple(s.download_allowed_hosts),
            )
        return self._downloader

    def fetch(
        self, artifact: ArtifactRef, url: str, *, protected: tuple[str, ...] = (), with_auth: bool = True
    ) -> Path:
        return self.downloader.fetch(artifact, url, protected=protected, with_auth=with_auth)

    # -- the surface for the API, the CLI and MQTT ------------------------------------------------

    def subscribe(self, observer: Observer) -> None:
        self._observers.append(observer)

    def submit_desired(self, desired: DesiredState) -> Future[None]:
        """Queue a desired state; the future completes when the agent has acted on it."""
        return self._enqueue("desired", desired)

    def request_rollback(self, reason: str = "operator requested rollback") -> Future[None]:
        """Queue a rollback to the previous model; the future raises RollbackError if there is none."""
        return self._enqueue("rollback", reason)

    def device_state(self) -> DeviceState:
        device_id = self.credential.device_id if self.credential else None
        return self.reconciler.state.to_wire(device_id=device_id, serving=self.slot.current is not None)

    @property
    def ready(self) -> bool:
        return self.slot.current is not None

    def record_request(self, operation: str, model: ServingModel | None, record: RequestRecord) -> None:
        """Account one inference request (numbers only: never its prompt or output)."""
        self.metrics.observe(operation, record)
        self.windows.record(model.spec if model else None, record)
        if model is not None:
            self.slot.record(model, error=record.error_type is not None)

    def artifact_url(self, artifact: ArtifactRef) -> tuple[str, bool]:
        """Resolve an artifact URL; the device credential goes only to the control plane itself.

        A URL elsewhere must pass the control plane's own rules for references (shared.references).
        """
        base = self.settings.control_plane_url or (self.credential.control_plane_url if self.credential else None)
        url = artifact.url or f"/v1/artifacts/{artifact.sha256}"
        if "://" in url:
            own = base is not None and url.startswith(base.rstrip("/") + "/")
            allowed = self.settings.download_allowed_hosts
            if not own and (problem := reference_problem(url, allowed_hosts=allowed)) is not None:
                shown = shown_reference(url)  # the reason travels in state reports and events
                raise DownloadError(f"artifact URL {shown!r} refused: {problem}", code="reference_refused")
            return url, own
        if not base:
            raise DownloadError(
                f"artifact URL {url!r} is relative but no control plane is configured",
                code="no_control_plane",
            )
        return base.rstrip("/") + "/" + url.lstrip("/"), True

    # -- internals --------------------------------------------------------------------------------

    def _enqueue(self, kind: str, payload: Any) -> Future[None]:
        future: Future[None] = Future()
        # A redelivery of the message being worked on must not stop it; anything else supersedes it.
        if kind != "desired" or payload.message_id != self._working_on:
            self._supersede.set()
        self._commands.put((kind, payload, future))
        return future

    def _reconcile_loop(self) -> None:
        try:
            self.reconciler.recover()
        except Exception:  # the loop must run even if recovery hit something unexpected
            log.exception("start-up recovery failed")
        self.started.set()
        while not self._stopping.is_set():
            try:
                kind, payload, future = self._commands.get(timeout=_TICK_S)
            except queue.Empty:
                self._safely(self.reconciler.check_trial)
                self._safely(self.reconciler.check_freshness)
                continue
            self._supersede.clear()
            self._working_on = payload.message_id if kind == "desired" else None
            try:
                if kind == "desired":
                    self.reconciler.apply(payload)
                else:
                    self.reconciler.rollback(reason=payload)
                future.set_result(None)
            except Exception as exc:  # one bad command must not stop the loop
                log.exception("%s failed", kind)
                future.set_exception(exc)

    def _safely(self, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception:
            log.exception("%s failed", getattr(step, "__name__", step))

    def emit_telemetry(self) -> TelemetryWindow:
        """Close the current telemetry window now and publish it."""
        return self.windows.flush()

    def _publish_window(self, window: TelemetryWindow) -> None:
        self.last_window = window
        self._notify(AgentEvent("telemetry", window))

    def _on_state_change(self, state: AgentState) -> None:
        serving = self.slot.current
        self.metrics.set_model(serving.spec if serving else None)
        self._notify(AgentEvent("state", self.device_state()))

    def _on_release_event(self, kind: str, desired: DesiredState, message: str, detail: dict[str, object]) -> None:
        detail = {**detail, "desired_message_id": desired.message_id, "rollout_id": desired.rollout_id}
        event = EventMessage(
            kind=cast(EventKind, kind),
            model=desired.model,
            version=desired.version,
            message=message[:500],
            detail=detail,
        )
        self._notify(AgentEvent("event", event))

    def _on_progress(self, progress: Progress) -> None:
        self.last_progress = progress
        self._notify(AgentEvent("progress", progress))

    def _notify(self, event: AgentEvent) -> None:
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:  # a failing publisher must not break reconciliation
                log.exception("observer failed on %s event", event.kind)
