"""Errors the agent raises. Each carries a stable `code` that state reports and tests assert on.

Error tree::

    AgentError
    ├── EnrollmentError         enrollment refused or the control plane unreachable at first start
    ├── DownloadError           an artifact could not be fetched
    │   ├── TransferError       network or server trouble; retried with backoff
    │   ├── IntegrityError      wrong size or sha256; never retried, the bytes are discarded
    │   └── InsufficientSpaceError  the artifact would not fit the disk or the store quota
    ├── ActivationError         a model failed to load or to pass its smoke test
    └── RollbackError           there is no verified previous model to return to
"""

from __future__ import annotations


class AgentError(Exception):
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
