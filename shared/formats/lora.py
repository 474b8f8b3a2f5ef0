"""Check that a GGUF LoRA adapter fits its base model before llama.cpp loads them together.

llama.cpp does not validate an adapter's tensor shapes against the base: loading a mismatched pair
crashes the process (SIGSEGV in llama-cpp-python 0.3.x). Reading both headers with `gguf` is cheap.
"""

from __future__ import annotations

from pathlib import Path

import gguf


def _shapes(reader: gguf.GGUFReader) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}


def lora_mismatches(base: Path | str, adapter: Path | str) -> list[str]:
    """Why `adapter` cannot apply to `base` (empty: it fits). Shapes are GGUF ne order: ne[0] = inputs."""
    try:
        base_shapes = _shapes(gguf.GGUFReader(Path(base)))
        adapter_shapes = _shapes(gguf.GGUFReader(Path(adapter)))
    except (OSError, ValueError) as exc:
        return [f"unreadable GGUF: {exc}"]
    problems: list[str] = []
    targets = {name.rsplit(".", 1)[0] for name in adapter_shapes if name.endswith((".lora_a", ".lora_b"))}
    if not targets:
        return ["the adapter has no lora_a/lora_b tensors"]
    for target in sorted(targets):
        a, b = adapter_shapes.get(f"{target}.lora_a"), adapter_shapes.get(f"{target}.lora_b")
        weight = base_shapes.get(target)
        if weight is None:
            problems.append(f"{target}: not in the base model")
        elif a is None or b is None or len(a) != 2 or len(b) != 2 or len(weight) < 2:
            problems.append(f"{target}: needs both 2-D lora_a and lora_b")
        elif a[0] != weight[0] or b[1] != weight[1] or a[1] != b[0]:
            problems.append(f"{target}: base {list(weight[:2])}, lora_a {list(a)}, lora_b {list(b)}")
    return problems
