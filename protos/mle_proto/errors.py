"""The exception tree shared by the operator and the agent, and its mapping to gRPC status codes.

    MleError                      exit 1   UNKNOWN
    ├── UsageError                exit 2   INVALID_ARGUMENT   bad flags or arguments
    ├── InvalidInput              exit 2   INVALID_ARGUMENT   a request or file that cannot be used
    ├── NotFound                  exit 4   NOT_FOUND          unknown run, task, artifact
    ├── AlreadyExists             exit 4   ALREADY_EXISTS
    ├── Unauthenticated           exit 6   UNAUTHENTICATED    missing or wrong credentials
    ├── PermissionDenied          exit 6   PERMISSION_DENIED
    ├── ResourceExhausted         exit 7   RESOURCE_EXHAUSTED message or disk too large/full
    ├── FailedPrecondition        exit 8   FAILED_PRECONDITION e.g. incompatible agent, draining
    ├── AgentUnavailable          exit 5   UNAVAILABLE        agent unreachable
    ├── DeadlineExceeded          exit 5   DEADLINE_EXCEEDED
    └── Cancelled                 exit 130 CANCELLED

Each class carries its status code *name* (so importing this module never imports grpc) and the
exit code the CLI uses. `to_status_code` / `from_rpc_error` translate at the gRPC boundary.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

__all__ = [
    "AgentUnavailable",
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidInput",
    "MleError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "UsageError",
    "error_for_status",
    "from_rpc_error",
]


class MleError(Exception):
    """Root of every error mle reports to a user."""

    status = "UNKNOWN"
    exit_code = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(MleError):
    """Bad command-line flags or arguments."""

    status = "INVALID_ARGUMENT"
    exit_code = 2


class InvalidInput(MleError):
    """A request, file or value that cannot be used as given."""

    status = "INVALID_ARGUMENT"
    exit_code = 2


class NotFound(MleError):
    """Unknown run, step, task, artifact or target."""

    status = "NOT_FOUND"
    exit_code = 4


class AlreadyExists(MleError):
    """Something with that identity already exists."""

    status = "ALREADY_EXISTS"
    exit_code = 4


class Unauthenticated(MleError):
    """Missing or wrong credentials."""

    status = "UNAUTHENTICATED"
    exit_code = 6


class PermissionDenied(MleError):
    """Authenticated, but not allowed."""

    status = "PERMISSION_DENIED"
    exit_code = 6


class ResourceExhausted(MleError):
    """A message, file or disk is too large or full."""

    status = "RESOURCE_EXHAUSTED"
    exit_code = 7


class FailedPrecondition(MleError):
    """The other side is not in a state to do this (incompatible, draining)."""

    status = "FAILED_PRECONDITION"
    exit_code = 8


class AgentUnavailable(MleError):
    """The agent cannot be reached."""

    status = "UNAVAILABLE"
    exit_code = 5


class DeadlineExceeded(MleError):
    """The call took longer than its deadline."""

    status = "DEADLINE_EXCEEDED"
    exit_code = 5


class Cancelled(MleError):
    """The operation was cancelled."""

    status = "CANCELLED"
    exit_code = 130


_BY_STATUS: dict[str, type[MleError]] = {}
for _cls in (
    InvalidInput,
    NotFound,
    AlreadyExists,
    Unauthenticated,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    AgentUnavailable,
    DeadlineExceeded,
    Cancelled,
):
    _BY_STATUS.setdefault(_cls.status, _cls)


def error_for_status(status: str) -> type[MleError]:
    """The exception class for a gRPC status code name."""
    return _BY_STATUS.get(status, MleError)


def from_rpc_error(error: grpc.RpcError, *, agent: str = "") -> MleError:
    """Translate a grpc.RpcError into the shared tree, naming the agent when known."""
    code = error.code()
    details = error.details() or code.name.lower()
    where = f"agent {agent}: " if agent else ""
    if code.name == "UNAVAILABLE":
        return AgentUnavailable(f"{where}unreachable ({details})")
    if code.name == "RESOURCE_EXHAUSTED" and (sizes := _TOO_LARGE.search(details)):
        size, limit = (int(n) / 1e6 for n in sizes.groups())
        return ResourceExhausted(
            f"{where}a message of {size:.1f} MB is over the {limit:.1f} MB limit; send less at "
            "once (fewer rows), or raise the agent's max_message_bytes"
        )
    return error_for_status(code.name)(f"{where}{details}")


# gRPC's words when the agent (the server) refuses a request over its size limit; a limit on
# this side would need other advice, so those keep gRPC's words.
_TOO_LARGE = re.compile(r"SERVER: Received message larger than max \((\d+) vs\. (\d+)\)")
