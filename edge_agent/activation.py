"""Loading a model, smoke-testing it, and switching traffic to it.

Normally the new engine loads beside the old one and traffic switches atomically. When memory would
not hold both, the old model is drained and closed first and the agent reports a short
unavailability (readyz 503, requests 503 with Retry-After) rather than risking the OOM killer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from edge_agent.errors import ActivationError
from edge_agent.runtime import Engine, EngineError, load_engine
from edge_agent.serving import ModelSlot, ServingModel
from shared.desired import DesiredState, GoldenSet
from shared.state import GoldenOutcome

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Room a loaded model needs beyond its file: KV cache, scratch buffers, runtime allocations.
_LOAD_OVERHEAD_BYTES = 64 * MiB

PathsFor = Callable[[DesiredState], tuple[Path, Path | None]]


def estimate_bytes(spec: DesiredState) -> int:
    size = spec.artifact.size_bytes + (spec.adapter.size_bytes if spec.adapter else 0)
    return int(size * 1.1) + _LOAD_OVERHEAD_BYTES


class Activator:
    def __init__(
        self,
        slot: ModelSlot,
        paths_for: PathsFor,
        *,
        smoke_timeout_s: float = 30.0,
        threads: int | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        self.slot = slot
        self.paths_for = paths_for
        self.smoke_timeout_s = smoke_timeout_s
        self.threads = threads
        self.memory_budget_bytes = memory_budget_bytes
        self.last_swap_mode: str | None = None  # "side_by_side" | "unload_first", for status and tests
        self.last_unavailable_s = 0.0  # how long the last unload-first swap left no model serving

    def available_bytes(self) -> int:
        available = psutil.virtual_memory().available
        if self.memory_budget_bytes is not None:
            used = psutil.Process().memory_info().rss
            available = min(available, self.memory_budget_bytes - used)
        return available

    def run_golden(self, version: str, golden: GoldenSet) -> GoldenOutcome:
        """The serving model's golden-set result; an engine fault is reported, never raised."""
        try:
            with self.slot.lease() as serving:
                return run_golden(serving.engine, version, golden)
        except Exception as exc:  # a golden run only reports: the trial and the gates decide
            log.exception("golden run of %s failed", version)
            reason = f"{type(exc).__name__}: {exc}"[:500]
            return GoldenOutcome(version=version, passed=0, total=len(golden.prompts), error=reason)

    def activate(self, spec: DesiredState) -> None:
        """Serve `spec` from now on; raises ActivationError with the old model still serving."""
        need = estimate_bytes(spec)
        available = self.available_bytes()
        old = self.slot.current
        if old is None or need <= available:
            self.last_swap_mode = "side_by_side"
            self.slot.install(ServingModel(spec, self._load(spec)))
            return
        log.warning(
            "model %s needs ~%d MiB but %d MiB are available: unloading %s first (short unavailability)",
            spec.version,
            need // MiB,
            available // MiB,
            old.spec.version,
        )
        self.last_swap_mode = "unload_first"
        offline_at = time.monotonic()
        self.slot.take_offline(f"swapping to {spec.model} {spec.version}: not enough memory for both")
        try:
            engine = self._load(spec)
        except ActivationError:
            self._restore(old.spec)
            raise
        finally:
            self.last_unavailable_s = time.monotonic() - offline_at
        self.slot.install(ServingModel(spec, engine))

    def _restore(self, spec: DesiredState) -> None:
        try:
            self.slot.install(ServingModel(spec, self._load(spec)))
        except ActivationError:
            log.exception("could not reload the previous model %s", spec.version)
            self.slot.set_unavailable(f"no model: reloading {spec.version} failed")

    def _load(self, spec: DesiredState) -> Engine:
        runtime = spec.runtime
        try:
            model_path, adapter_path = self.paths_for(spec)  # may unpack a folder bundle again
            engine = load_engine(
                model_path,
                spec.artifact.format,
                n_ctx=runtime.n_ctx,
                n_threads=runtime.n_threads or self.threads,
                lora_path=adapter_path,
                chat_template=runtime.chat_template,
            )
        except EngineError as exc:
            raise ActivationError(f"load failed: {exc}", code="load_failed") from exc
        except Exception as exc:  # runtimes raise all sorts on a malformed file; none may escape
            raise ActivationError(f"load failed: {type(exc).__name__}: {exc}", code="load_failed") from exc
        try:
            engine.smoke_test(timeout_s=self.smoke_timeout_s)
        except Exception as exc:
            _close_later(engine)
            raise ActivationError(f"smoke test failed: {exc}", code="smoke_test_failed") from exc
        return engine


def run_golden(engine: Engine, version: str, golden: GoldenSet) -> GoldenOutcome:
    """Answer every golden prompt greedily (the chat template applied) and check it by its rule."""
    failed = []
    for item in golden.prompts:
        chunks = engine.chat([{"role": "user", "content": item.prompt}], max_tokens=item.max_tokens)
        if not item.accepts("".join(chunk.text for chunk in chunks)):
            failed.append(item.id)
    return GoldenOutcome(version=version, passed=len(golden.prompts) - len(failed), total=len(golden.prompts),
                         failed=failed)  # fmt: skip


def _close_later(engine: Engine) -> None:
    # A timed-out smoke test may still hold the engine; closing waits for it, so not on this thread.
    threading.Thread(target=engine.close, name="engine-close", daemon=True).start()
