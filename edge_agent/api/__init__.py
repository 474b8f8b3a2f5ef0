"""The agent's local HTTP API: OpenAI-compatible inference, ONNX tensors, health, metrics, admin."""
