"""amqtt plugins that give the embedded broker device credentials and per-device topic isolation.

amqtt builds plugins from dotted paths plus a plain-data `Config` dataclass, so a live callback
cannot be passed in the configuration; each broker registers its password check and topic policy
here under a key and names the key in the plugin's config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from amqtt.contexts import Action, BaseContext
from amqtt.mqtt.connack import BAD_USERNAME_PASSWORD, IDENTIFIER_REJECTED, NOT_AUTHORIZED
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from shared.topics import DEVICE_PUBLISHED_KINDS, Topics

log = logging.getLogger(__name__)

PasswordCheck = Callable[[str, str], bool]
"""`check(username, password)`: True when the pair may connect."""


@dataclass(frozen=True)
class TopicPolicy:
    """Who may touch what: admins everything, a device (username = device id) only its own topics.

    The same rules the Mosquitto ACL in deploy/mosquitto/ expresses with `pattern ... %u`.
    """

    topics: Topics
    admin_users: frozenset[str] = field(default_factory=frozenset)

    def allows(self, username: str | None, topic: str, action: Action) -> bool:
        if username is not None and username in self.admin_users:
            return True
        if username is None:
            return False
        if action == Action.RECEIVE:
            return True  # a device only holds subscriptions that passed the SUBSCRIBE check
        if action == Action.SUBSCRIBE:
            return topic == self.topics.desired(username)
        parsed = self.topics.parse(topic)
        return parsed is not None and parsed.device_id == username and parsed.kind in DEVICE_PUBLISHED_KINDS


@dataclass(frozen=True)
class ConnectPolicy:
    """Who may connect, and under which client id: a device only as itself, so nobody but an admin
    can hold another client's session (the Mosquitto device listener's `use_username_as_clientid`)."""

    check: PasswordCheck
    admin_users: frozenset[str] = field(default_factory=frozenset)
    topics: TopicPolicy | None = None

    def refusal(
        self, username: str | None, password: str | None, client_id: str | None, will_topic: str | None = None
    ) -> int | None:
        """None to accept, else the CONNACK return code (MQTT 3.1.1 section 3.2.2.3).

        `will_topic` (when the will flag is set): amqtt publishes a will without the PUBLISH check,
        so a will the client could not publish itself refuses the CONNECT, as Mosquitto does."""
        if not username or password is None or not self._credentials_valid(username, password):
            return BAD_USERNAME_PASSWORD
        if username not in self.admin_users and client_id != username:
            return IDENTIFIER_REJECTED
        if will_topic is not None and self.topics is not None:
            if not self.topics.allows(username, will_topic, Action.PUBLISH):
                return NOT_AUTHORIZED
        return None

    def _credentials_valid(self, username: str, password: str) -> bool:
        try:
            return bool(self.check(username, password))
        except Exception:
            # A failing check must refuse the client, not crash the broker's handler.
            log.exception("password check failed for %s", username)
            return False


_CONNECT_POLICIES: dict[str, ConnectPolicy] = {}
_TOPIC_POLICIES: dict[str, TopicPolicy] = {}


def register(key: str, *, connect: ConnectPolicy | None, policy: TopicPolicy | None) -> None:
    if connect is not None:
        _CONNECT_POLICIES[key] = connect
    if policy is not None:
        _TOPIC_POLICIES[key] = policy


def unregister(key: str) -> None:
    _CONNECT_POLICIES.pop(key, None)
    _TOPIC_POLICIES.pop(key, None)


class PasswordCheckAuthPlugin(BaseAuthPlugin):
    """Refuses anonymous clients; asks the registered `ConnectPolicy` about everyone else."""

    @dataclass
    class Config:
        registry_key: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._key: str = self._get_config_option("registry_key", "")

    async def authenticate(self, *, session: Session) -> bool | None:
        connect = _CONNECT_POLICIES.get(self._key)
        if connect is None:
            return False
        will_topic = session.will_topic if session.will_flag else None
        return connect.refusal(session.username, session.password, session.client_id, will_topic) is None


class DeviceTopicPlugin(BaseTopicPlugin):
    """Applies the registered `TopicPolicy` to every publish, subscribe and delivery."""

    @dataclass
    class Config:
        registry_key: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._key: str = self._get_config_option("registry_key", "")

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        policy = _TOPIC_POLICIES.get(self._key)
        if policy is None or topic is None or action is None:
            return False
        return policy.allows(session.username if session else None, topic, action)
