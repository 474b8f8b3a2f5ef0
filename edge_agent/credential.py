"""Credential rotation: the agent asks the control plane now and then whether to rotate; when an
operator asked for it, it fetches its new secret, stores it, completes the rotation by using it
once, and hands it to its HTTP client and its MQTT channel. The old secret keeps working for the rotation's grace
period, so nothing the agent does is interrupted.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from edge_agent.enroll import Credential
from edge_agent.fsutil import write_atomic
from shared.enrollment import CredentialRotation

if TYPE_CHECKING:
    from edge_agent.agent import Agent
    from edge_agent.mqtt.channel import MqttChannel

log = logging.getLogger(__name__)


class CredentialRotator:
    def __init__(self, agent: Agent, channel: MqttChannel | None, *, interval_s: float) -> None:
        self.agent = agent
        self.channel = channel
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="credential-rotation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import httpx  # on first use, as the agent's own HTTP client (idle memory)

        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except (httpx.HTTPError, ValueError) as exc:  # the next check tries again
                log.warning("credential rotation check failed: %s", exc)

    def check_once(self) -> bool:
        """Rotate when the control plane asks for it; True when the credential changed."""
        import httpx

        credential, base = self.agent.credential, self._base_url()
        if credential is None or base is None:
            return False
        auth = httpx.BasicAuth(credential.device_id, credential.device_secret)
        me = self.agent.http.get(f"{base}/v1/devices/me", auth=auth, timeout=10)
        me.raise_for_status()
        if not me.json().get("rotation_requested_at"):
            return False
        answer = self.agent.http.post(f"{base}/v1/devices/me/credential", auth=auth, timeout=10)
        answer.raise_for_status()
        rotation = CredentialRotation.model_validate_json(answer.content)
        rotated = credential.model_copy(update={"device_secret": rotation.device_secret})
        # Stored first: a crash right after must not leave the agent with only the expiring secret.
        write_atomic(self.agent.settings.credential_path, rotated.model_dump_json().encode(), mode=0o600)
        # The new secret's first use completes the rotation; until then the current one stays
        # in use, and a failure here fetches a fresh secret at the next check.
        confirmed = self.agent.http.get(
            f"{base}/v1/devices/me", auth=httpx.BasicAuth(rotated.device_id, rotated.device_secret), timeout=10
        )
        confirmed.raise_for_status()
        self._adopt(rotated)
        log.info("credential rotated; the previous one works until at least %s", rotation.previous_valid_until)
        return True

    def _adopt(self, credential: Credential) -> None:
        self.agent.use_credential(credential)
        self.agent.renew_identity_if_due(force=True)  # the rotation revoked the certificates
        if self.channel is not None:
            self.channel.use_secret(credential.device_secret)

    def _base_url(self) -> str | None:
        credential = self.agent.credential
        base = self.agent.settings.control_plane_url or (credential.control_plane_url if credential else None)
        return base.rstrip("/") if base else None
