"""Artifact formats both sides read: bounded GGUF headers, ONNX bundles, LoRA checks, the byte vocabulary."""
