"""Desired state: what model a device should run. Sent retained over MQTT, or read from a file."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from shared import limits
from shared.base import WireModel
from shared.limits import MessageId, ModelName, ShortName, VersionName
from shared.signing import SignedMetadata

ArtifactFormat = Literal["gguf", "onnx", "onnx-tar", "gguf-lora"]
BUNDLE_FORMAT = "onnx-tar"  # an ONNX model folder with external data, packed as one tar the agent unpacks


class ArtifactRef(WireModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    format: ArtifactFormat
    quantization: ShortName | None = None
    # Relative URLs resolve against the control plane's base URL; absolute https:// URLs are used as is.
    url: str | None = Field(default=None, max_length=2000)


class RuntimeParams(WireModel):
    n_ctx: int = Field(default=512, ge=16)
    n_threads: int | None = Field(default=None, ge=1)
    chat_template: str | None = None


class GoldenPrompt(WireModel):
    """A prompt with its accepted answers: it passes when the greedy reply contains one of them
    as a whole word or phrase, ignoring case (a rule, not a judgement by eye)."""

    id: str = Field(min_length=1, max_length=64)
    prompt: str = Field(min_length=1, max_length=2000)
    accept: list[str] = Field(min_length=1, max_length=16)
    max_tokens: int = Field(default=16, ge=1, le=128)

    def accepts(self, reply: str) -> bool:
        text = " ".join(reply.lower().split())
        return any(_phrase(answer).search(text) for answer in self.accept if answer.strip())


def _phrase(answer: str) -> re.Pattern[str]:
    # Escaped, so an accepted answer is literal text and never a pattern the device has to run; "0"
    # must not match inside "-18.0", nor "4" inside "14" or "4.5".
    words = re.escape(" ".join(answer.lower().split()))
    return re.compile(rf"(?<![\w.-]){words}(?!\w|\.\d)")


class GoldenSet(WireModel):
    """Prompts a version is checked with on the device during its trial (bounded: it is parsed there)."""

    prompts: list[GoldenPrompt] = Field(min_length=1, max_length=limits.MAX_GOLDEN_PROMPTS)


class DesiredState(WireModel):
    """A device's target. `message_id` makes a duplicated QoS 1 delivery idempotent.

    With `unload`, the target is to serve nothing: the control plane withdraws `version` (named
    by `artifact`) from a device that ran nothing before the rollout being rolled back. The field
    defaults to false, so messages from older control planes read as they always did.
    """

    message_id: MessageId
    model: ModelName
    version: VersionName
    artifact: ArtifactRef
    adapter: ArtifactRef | None = None  # a LoRA adapter applied on top of `artifact`
    runtime: RuntimeParams = Field(default_factory=RuntimeParams)
    rollout_id: str | None = None
    unload: bool = False
    golden: GoldenSet | None = None  # run on the device during the trial; its pass rate is reported
    # The signed release this state asks for (shared.releases), and the root chain that proves
    # its keys; a device with a pinned root refuses a state its release does not cover.
    release: SignedMetadata | None = None
    roots: list[SignedMetadata] = Field(default_factory=list, max_length=32)

    def withdrawal_reason(self) -> str:
        """The reason a device reports once it serves nothing because of this (unload) state."""
        return f"{self.model} {self.version} was withdrawn by the control plane: serving nothing"
