"""Write small but real llama-architecture GGUF files (random weights, byte-fallback vocabulary).

The vocabulary is SentencePiece-style ("llama" tokenizer model): <unk>, <s>, </s>, the 256 byte
tokens `<0x00>`..`<0xFF>` (so llama.cpp can tokenize and detokenize any text), then one token per
printable ASCII character ("▁" stands for the space, as in SentencePiece). Token ids of the byte
tokens are `3 + byte`, the same ids the tiny ONNX model uses.

The output projection favours the printable tokens, so greedy text is readable gibberish and the
end-of-sequence token is practically never chosen: generation runs to `max_tokens` unless a stop
string ends it. All row sizes are multiples of 256, so every llama.cpp quantization type applies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import gguf
import numpy as np

from shared.formats.byte_vocab import BOS_ID, BYTE_OFFSET, EOS_ID, UNK_ID

SizeName = Literal["tiny", "small"]

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPM_SPACE = "\u2581"
# Row scale of the output projection for tokens we do not want greedy decoding to pick.
_DISFAVOURED_ROW_SCALE = 0.25


@dataclass(frozen=True)
class TinyLlamaShape:
    """Hyperparameters of a tiny llama model; every width is a multiple of 256 (K-quant blocks)."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int = 2048

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SHAPES: dict[str, TinyLlamaShape] = {
    "tiny": TinyLlamaShape(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2),
    "small": TinyLlamaShape(n_layer=4, n_embd=512, n_ff=1024, n_head=8, n_head_kv=4),
}
# A deliberately slower variant (for rollout demos): four times the layers of its base size.
SLOW_LAYER_FACTOR = 4


def tiny_vocab() -> tuple[list[str], list[int]]:
    """Tokens and their gguf.TokenType values: specials, 256 byte tokens, printable ASCII."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    printable = [SPM_SPACE] + [chr(c) for c in range(0x21, 0x7F)]
    tokens += printable
    types += [gguf.TokenType.NORMAL] * len(printable)
    return tokens, [int(t) for t in types]


def resolve_shape(size: SizeName, *, slow: bool = False, layers: int | None = None) -> TinyLlamaShape:
    """The shape for a size name, with `slow` or an explicit layer count applied."""
    if size not in SHAPES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SHAPES)}")
    shape = SHAPES[size]
    if layers is not None:
        if layers < 1:
            raise ValueError("layers must be at least 1")
        return replace(shape, n_layer=layers)
    if slow:
        return replace(shape, n_layer=shape.n_layer * SLOW_LAYER_FACTOR)
    return shape


def _linear(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    # numpy shape (out, in) is GGUF ne = [in, out]: rows of length n_in, as llama.cpp expects.
    return (rng.standard_normal((n_out, n_in), dtype=np.float32) / np.sqrt(n_in)).astype(np.float32)


def _tensors(shape: TinyLlamaShape, n_vocab: int, n_favoured_from: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    kv_dim = shape.n_head_kv * shape.head_dim
    ones = np.ones(shape.n_embd, dtype=np.float32)
    output = _linear(rng, n_vocab, shape.n_embd)
    output[:n_favoured_from] *= _DISFAVOURED_ROW_SCALE
    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": rng.standard_normal((n_vocab, shape.n_embd), dtype=np.float32),
        "output_norm.weight": ones.copy(),
        "output.weight": output,
    }
    for i in range(shape.n_layer):
        tensors |= {
            f"blk.{i}.attn_norm.weight": ones.copy(),
            f"blk.{i}.attn_q.weight": _linear(rng, shape.n_embd, shape.n_embd),
            f"blk.{i}.attn_k.weight": _linear(rng, kv_dim, shape.n_embd),
            f"blk.{i}.attn_v.weight": _linear(rng, kv_dim, shape.n_embd),
            f"blk.{i}.attn_output.weight": _linear(rng, shape.n_embd, shape.n_embd),
            f"blk.{i}.ffn_norm.weight": ones.copy(),
            f"blk.{i}.ffn_gate.weight": _linear(rng, shape.n_ff, shape.n_embd),
            f"blk.{i}.ffn_up.weight": _linear(rng, shape.n_ff, shape.n_embd),
            f"blk.{i}.ffn_down.weight": _linear(rng, shape.n_embd, shape.n_ff),
        }
    return tensors


def _add_llama_metadata(writer: gguf.GGUFWriter, shape: TinyLlamaShape, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)


def _add_tokenizer(writer: gguf.GGUFWriter, tokens: list[str], types: list[int], chat_template: str) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)


def _write(writer: gguf.GGUFWriter, tensors: dict[str, np.ndarray]) -> None:
    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_gguf(
    path: Path | str,
    *,
    seed: int = 0,
    size: SizeName = "tiny",
    slow: bool = False,
    layers: int | None = None,
    shape: TinyLlamaShape | None = None,
    chat_template: str = TINY_CHAT_TEMPLATE,
) -> Path:
    """Write a random-weight F32 llama GGUF; the same arguments always give the same bytes.

    `slow=True` quadruples the layer count (about four times the compute per token); `layers`
    sets the layer count explicitly and wins over `slow`; `shape` replaces all of them (tests use it
    for widths that some quantization types cannot handle).
    """
    shape = shape or resolve_shape(size, slow=slow, layers=layers)
    tokens, types = tiny_vocab()
    first_printable = BYTE_OFFSET + 256
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, "llama")
    _add_llama_metadata(writer, shape, name=f"slmops-tiny-{size}-L{shape.n_layer}-s{seed}")
    _add_tokenizer(writer, tokens, types, chat_template)
    _write(writer, _tensors(shape, len(tokens), first_printable, seed))
    return out


def write_tiny_lora_gguf(
    base_path: Path | str, out_path: Path | str, seed: int = 0, *, rank: int = 8, alpha: float = 16.0
) -> Path:
    """Write a LoRA adapter GGUF for a tiny base model (attn_q and attn_v of every layer).

    llama.cpp expects `lora_a` with ne = [n_in, rank] and `lora_b` with ne = [rank, n_out]; numpy
    shapes are the reverse. The base model's shape is read back from its GGUF metadata.
    """
    reader = gguf.GGUFReader(Path(base_path))
    n_layer = int(reader.fields["llama.block_count"].contents())
    n_embd = int(reader.fields["llama.embedding_length"].contents())
    v_dims = {t.name: int(t.shape[1]) for t in reader.tensors if t.name.endswith("attn_v.weight")}
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for i in range(n_layer):
        for target, n_out in (("attn_q", n_embd), ("attn_v", v_dims[f"blk.{i}.attn_v.weight"])):
            prefix = f"blk.{i}.{target}.weight"
            tensors[f"{prefix}.lora_a"] = _linear(rng, rank, n_embd)
            tensors[f"{prefix}.lora_b"] = _linear(rng, n_out, rank)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(f"slmops-tiny-lora-r{rank}-s{seed}")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    _write(writer, tensors)
    return out
