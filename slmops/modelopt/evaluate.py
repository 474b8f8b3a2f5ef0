"""Compare a candidate model (quantized, adapted) with its reference by greedy agreement.

For each prompt both engines generate greedily; a prompt's agreement is the share of the reference's
tokens the candidate reproduced before their first difference. It needs no labels, so it works on
any model, and a quantization that damages a model shows up as early divergence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from control_plane.modelopt.prompts import default_prompts

if TYPE_CHECKING:
    from edge_agent.runtime import Engine


@dataclass(frozen=True)
class PromptAgreement:
    """One prompt's outcome: tokens both produced identically before diverging, out of how many."""

    prompt: str
    matched_tokens: int
    reference_tokens: int

    @property
    def exact(self) -> bool:
        return self.matched_tokens == self.reference_tokens


@dataclass(frozen=True)
class AgreementReport:
    """Greedy agreement of a candidate with its reference over a prompt set."""

    prompts: list[PromptAgreement]

    @property
    def token_agreement(self) -> float:
        """Matched prefix tokens over all reference tokens, 0..1."""
        total = sum(p.reference_tokens for p in self.prompts)
        return sum(p.matched_tokens for p in self.prompts) / total if total else 1.0

    @property
    def exact_match_rate(self) -> float:
        """Share of prompts whose whole greedy output matched, 0..1."""
        return sum(p.exact for p in self.prompts) / len(self.prompts) if self.prompts else 1.0


def _greedy_tokens(engine: Engine, prompt: str, max_tokens: int, chat: bool) -> list[str]:
    if chat:
        stream = engine.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens)
    else:
        stream = engine.complete(prompt, max_tokens=max_tokens)
    return [chunk.text for chunk in stream if chunk.finish_reason is None]


def _matched_prefix(reference: list[str], candidate: list[str]) -> int:
    for index, (want, got) in enumerate(zip(reference, candidate, strict=False)):
        if want != got:
            return index
    return min(len(reference), len(candidate))


def greedy_agreement(
    reference: Engine,
    candidate: Engine,
    prompts: Sequence[str] | None = None,
    *,
    max_tokens: int = 16,
    chat: bool = True,
) -> AgreementReport:
    """Run every prompt through both engines (greedy) and measure how long their outputs agree."""
    results = []
    for prompt in prompts if prompts is not None else default_prompts():
        want = _greedy_tokens(reference, prompt, max_tokens, chat)
        got = _greedy_tokens(candidate, prompt, max_tokens, chat)
        results.append(PromptAgreement(prompt, _matched_prefix(want, got), len(want)))
    return AgreementReport(results)
