"""amqtt plugins that give the embedded broker device credentials and per-device topic isolation.

amqtt builds plugins from dotted paths plus a plain-data `Config` dataclass, so a live callback
cannot be passed in the configuration; each broker registers its password check and topic policy
here under a key and names the key in the plugin's config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from shared.topics import DEVICE_PUBLISHED_KINDS, Topics

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


_PASSWORD_CHECKS: dict[str, PasswordCheck] = {}
_TOPIC_POLICIES: dict[str, TopicPolicy] = {}


def register(key: str, *, check: PasswordCheck | None, policy: TopicPolicy | None) -> None:
    if check is not None:
        _PASSWORD_CHECKS[key] = check
    if policy is not None:
        _TOPIC_POLICIES[key] = policy


def unregister(key: str) -> None:
    _PASSWORD_CHECKS.pop(key, None)
    _TOPIC_POLICIES.pop(key, None)


class PasswordCheckAuthPlugin(BaseAuthPlugin):
    """Refuses anonymous clients; asks the registered check about everyone else."""

    @dataclass
    class Config:
        registry_key: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._key: str = self._get_config_option("registry_key", "")

    async def authenticate(self, *, session: Session) -> bool | None:
        check = _PASSWORD_CHECKS.get(self._key)
        if check is None or not session.username or session.password is None:
            return False
        try:
            return bool(check(session.username, session.password))
        except Exception:
            # A failing check must refuse the client, not crash the broker's handler.
            self.context.logger.exception("password check failed for %s", session.username)
            return False


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
