"""Measure one model on this machine: load time, speed, peak RSS, and the raw outputs quality needs.

Each model is measured in a fresh spawned process, so its peak RSS is its own and a crash in a
native runtime cannot take the caller down. What comes back is plain data (floats and numpy
arrays) that `slmops.modelopt.compare` turns into metrics against a parent.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import resource
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.desired import GoldenSet
from shared.state import GoldenOutcome

if TYPE_CHECKING:
    from edge_agent.runtime import Engine

GEN_TOKENS = 32
SPEED_ROUNDS = 3
ONNX_INPUT_SEQS = 8
ONNX_SEQ_LEN = 48


@dataclass
class Measurement:
    """What measuring one model produced; `argmax` and `logits` are compared with the parent's."""

    path: str
    format: str
    size_bytes: int
    load_s: float
    ms_per_token: float | None
    peak_rss_mb: float
    ttft_ms: float | None = None  # time to the first generated token
    perplexity: float | None = None
    golden_passed: int | None = None  # golden prompts answered acceptably (None: not a chat model)
    golden_total: int = 0
    golden_failed: list[str] = field(default_factory=list)
    argmax: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    logits: np.ndarray | None = None  # ONNX only: the outputs on the deterministic input set

    @property
    def tokens_per_s(self) -> float | None:
        return 1000.0 / self.ms_per_token if self.ms_per_token else None


def eval_texts(name: str = "eval_text.txt") -> list[str]:
    """A packaged text set, one paragraph per entry: `eval_text.txt` (project prose, for agreement)
    or `public_domain.txt` (public-domain passages, for perplexity)."""
    text = resources.files("slmops.modelopt").joinpath(f"data/{name}").read_text(encoding="utf-8")
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return [p.strip() for p in body.split("\n\n") if p.strip()]


def golden_set() -> GoldenSet:
    """The packaged golden-prompt set (slmops/modelopt/data/golden.json)."""
    text = resources.files("slmops.modelopt").joinpath("data/golden.json").read_text(encoding="utf-8")
    return GoldenSet.model_validate({"prompts": json.loads(text)["prompts"]})


def _golden(engine: Engine) -> GoldenOutcome | None:
    from edge_agent.activation import run_golden
    from edge_agent.runtime import UnsupportedOperation

    try:
        return run_golden(engine, "", golden_set())
    except UnsupportedOperation:
        return None  # a graph that is not a language model answers no prompts


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _speed(engine: object) -> tuple[float | None, float | None]:
    """(ms per token, ms to the first token), each the best of a few greedy runs: on a shared
    machine the fastest run is the least disturbed."""
    from edge_agent.runtime import UnsupportedOperation

    best: float | None = None
    first: float | None = None
    try:
        list(engine.complete("Hello", max_tokens=2))  # type: ignore[attr-defined]  # warm-up
        for _ in range(SPEED_ROUNDS):
            started = time.perf_counter()
            stream = engine.complete("The pump in bay seven", max_tokens=GEN_TOKENS)  # type: ignore[attr-defined]
            chunk = next(stream)
            ttft = (time.perf_counter() - started) * 1000.0
            chunks = [chunk, *stream]
            produced = max(1, len([c for c in chunks if c.finish_reason is None]))
            ms = (time.perf_counter() - started) * 1000.0 / produced
            best = ms if best is None else min(best, ms)
            first = ttft if first is None else min(first, ttft)
    except UnsupportedOperation:
        return None, None  # a graph that is not a language model has no per-token speed
    return best, first


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of `targets` (one per row of `logits`)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    return float((log_z - shifted[np.arange(len(targets)), targets]).sum())


def _gguf_quality(path: Path, lora_path: Path | None) -> tuple[float, np.ndarray]:
    """Perplexity on the text set, and the greedy next token at every position of the text set
    and the prompt set (teacher forced, so one early difference does not hide the rest)."""
    import llama_cpp

    from slmops.modelopt.evaluate import default_prompts

    lora = str(lora_path) if lora_path else None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, logits_all=True, verbose=False, seed=0, lora_path=lora)
    texts = eval_texts("public_domain.txt")
    total_nll, total_tokens, argmaxes = 0.0, 0, []
    try:
        for index, text in enumerate(texts + eval_texts() + default_prompts()):
            tokens = llm.tokenize(text.encode("utf-8"), add_bos=True)[: llm.n_ctx()]
            llm.reset()
            llm.eval(tokens)
            logits = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
            if index < len(texts):
                total_nll += _nll(logits[:-1], np.asarray(tokens[1:]))
                total_tokens += len(tokens) - 1
            else:
                argmaxes.append(logits.argmax(axis=1))
    finally:
        llm.close()
    return math.exp(total_nll / total_tokens), np.concatenate(argmaxes)


def _onnx_inputs(session: object) -> dict[str, np.ndarray]:
    """A deterministic input set: text bytes for byte LMs, seeded random values otherwise."""
    from shared.formats.byte_vocab import encode_bytes

    specs = session.get_inputs()  # type: ignore[attr-defined]
    if [s.name for s in specs] == ["input_ids"]:
        data = "\n".join(eval_texts()).encode("utf-8")
        rows = [encode_bytes(data[i * ONNX_SEQ_LEN : (i + 1) * ONNX_SEQ_LEN - 1]) for i in range(ONNX_INPUT_SEQS)]
        return {"input_ids": np.asarray(rows, dtype=np.int64)}
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in specs:
        shape = [d if isinstance(d, int) and d > 0 else ONNX_INPUT_SEQS for d in spec.shape]
        if "int" in spec.type:
            feeds[spec.name] = rng.integers(0, 2, size=shape, dtype=np.int64)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _onnx_quality(path: Path) -> tuple[float | None, np.ndarray, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feeds = _onnx_inputs(session)
    logits = np.asarray(session.run([session.get_outputs()[0].name], feeds)[0], dtype=np.float32)
    perplexity = None
    if list(feeds) == ["input_ids"] and logits.ndim == 3:
        flat = logits[:, :-1].reshape(-1, logits.shape[-1]).astype(np.float64)
        targets = feeds["input_ids"][:, 1:].reshape(-1)
        perplexity = math.exp(_nll(flat, targets) / len(targets))
    return perplexity, logits.argmax(axis=-1).reshape(-1), logits


def measure_here(path: Path | str, fmt: str, lora_path: Path | str | None = None) -> Measurement:
    """Measure in this process (peak RSS is then this process's peak so far).

    With `lora_path` the model is the base plus that adapter, and its size is the adapter's: the
    bytes a device that runs the base has to fetch.
    """
    from edge_agent.runtime import load_engine

    model_path = Path(path)
    lora = Path(lora_path) if lora_path else None
    started = time.perf_counter()
    engine = load_engine(model_path, fmt, n_ctx=512, lora_path=lora)
    load_s = time.perf_counter() - started
    try:
        ms_per_token, ttft_ms = _speed(engine)
        golden = _golden(engine)
        # Serving memory: the quality pass below holds every position's logits, which a server does not.
        serving_peak_mb = _peak_rss_mb()
    finally:
        engine.close()
    logits: np.ndarray | None = None
    perplexity: float | None
    if fmt == "gguf":
        perplexity, argmax = _gguf_quality(model_path, lora)
    else:
        perplexity, argmax, logits = _onnx_quality(model_path)
    return Measurement(
        path=str(model_path),
        format=fmt,
        size_bytes=_model_bytes(model_path, fmt, lora),
        load_s=load_s,
        ms_per_token=ms_per_token,
        ttft_ms=ttft_ms,
        peak_rss_mb=serving_peak_mb,
        perplexity=perplexity,
        golden_passed=golden.passed if golden else None,
        golden_total=golden.total if golden else 0,
        golden_failed=golden.failed if golden else [],
        argmax=argmax,
        logits=logits,
    )


def _model_bytes(model_path: Path, fmt: str, lora: Path | None) -> int:
    if lora is not None:  # what a device that runs the base fetches
        return lora.stat().st_size
    if fmt == "onnx-tar":  # the graph and its external data: the unpacked folder holds nothing else
        return sum(p.stat().st_size for p in model_path.parent.rglob("*") if p.is_file())
    return model_path.stat().st_size


def measure(path: Path | str, fmt: str, lora_path: Path | str | None = None) -> Measurement:
    """Measure in a fresh spawned process, so peak RSS belongs to this model alone."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(measure_here, (str(path), fmt, str(lora_path) if lora_path else None))
