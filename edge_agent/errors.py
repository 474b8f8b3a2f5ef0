"""Errors the agent raises. `AgentError`s carry a stable `code` that state reports and tests assert on.

Error tree::

    EdgeAgentError              the root: `except EdgeAgentError` catches any error of the agent
    ├── AgentError              the reconciler's failures, each with a `code`
    │   ├── ConfigError         the settings file or environment is invalid (settings.py)
    │   ├── EnrollmentError     enrollment refused or the control plane unreachable at first start
    │   ├── DownloadError       an artifact could not be fetched
    │   │   ├── TransferError   network or server trouble; retried with backoff
    │   │   ├── IntegrityError  wrong size or sha256; never retried, the bytes are discarded
    │   │   └── InsufficientSpaceError  the artifact would not fit the disk or the store quota
    │   ├── ActivationError     a model failed to load or to pass its smoke test
    │   └── RollbackError       there is no verified previous model to return to
    ├── EngineError             an inference engine failed or refused an operation (runtime/base.py)
    │   ├── ModelLoadError      the runtime could not load the model file
    │   ├── ContextOverflowError  the prompt plus the requested tokens exceed the context
    │   ├── InvalidInput        the request's content cannot be generated from
    │   └── UnsupportedOperation  the operation does not apply to this model's format
    │       └── UnsupportedParameter  a request option this engine does not implement
    ├── NoModelError            nothing is serving right now (serving.py)
    └── APIError                an OpenAI-shaped error response of the local API (api/errors.py)
        └── QueueFull           too many requests already wait for the model (api/limits.py)

Not in the tree: BodyTooLarge, a Starlette HTTPException so that the framework handles it, and
private control-flow signals that never leave their module.
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base of every error from the `edge_agent` package."""


class AgentError(EdgeAgentError):
    code = "agent_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class EnrollmentError(AgentError):
    code = "enrollment_failed"


class DownloadError(AgentError):
    code = "download_failed"


class TransferError(DownloadError):
    code = "transfer_failed"


class IntegrityError(DownloadError):
    code = "integrity_check_failed"


class InsufficientSpaceError(DownloadError):
    code = "insufficient_space"


class ActivationError(AgentError):
    code = "activation_failed"


class RollbackError(AgentError):
    code = "rollback_unavailable"
