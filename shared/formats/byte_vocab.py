"""The byte-level vocabulary of slmops' ONNX models (and the tiny GGUF test models): a token per
byte, after three specials. The ONNX runtime, the static quantizer's calibration and the tiny-model
writers all encode with it, so it is defined here once."""

from __future__ import annotations

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # token id of byte 0x00
BYTE_VOCAB = BYTE_OFFSET + 256  # 259 tokens in all


def encode_bytes(text: str | bytes) -> list[int]:
    """BOS, then one token per UTF-8 byte."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return [BOS_ID] + [BYTE_OFFSET + b for b in data]
