"""The one exception hierarchy of chatgate, and its mapping to wire formats.

    ChatgateError                       500 server_error
    ├── InvalidRequestError             400 invalid_request_error
    │   └── ContextLengthExceededError  400 invalid_request_error / context_length_exceeded
    ├── AuthenticationError             401 invalid_api_key
    ├── PermissionDeniedError           403 permission_denied: an accepted key, not allowed here
    ├── ModelNotFoundError              404 model_not_found
    ├── InsufficientMemoryError         409 insufficient_memory: a load that would not fit now
    ├── RequestTooLargeError            413 request_too_large
    ├── OverloadedError                 429 engine_overloaded (with Retry-After)
    ├── RateLimitExceededError          429 rate_limit_exceeded: a per-key limit (with Retry-After)
    ├── NoHealthyWorkerError            503 service_unavailable (with Retry-After)
    │   ├── QueueTimeoutError           503 queue_timeout: not started within --max-queue-wait
    │   └── WorkerUnavailableError      a worker failed before answering: retried elsewhere
    │       └── ShuttingDownError       the process is draining (new work refused, late streams ended)
    ├── RequestTimeoutError             504 request_timeout: past the client's x-request-timeout
    └── WorkerError                     502 upstream worker failed
        └── WorkerLostError             it broke or went silent mid-stream: a response not yet
                                        sent is retried elsewhere

Serving code raises these; one handler in the API app turns them into OpenAI-shaped bodies.
FastChat's numeric error codes exist only on the internal worker protocol and are mapped here.

`StartupError` stands apart: no client sees it. A process that cannot start says it in one line.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class ChatgateError(Exception):
    """Base of every error chatgate reports to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = "server_error"
    fastchat_code: ClassVar[int] = 50001

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers that go with this error."""
        return {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(ChatgateError):
    """The request is malformed or asks for something out of range."""

    status = 400
    type = "invalid_request_error"
    default_code: ClassVar[str | None] = None
    fastchat_code = 40302


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus completion do not fit the model's context window."""

    default_code = "context_length_exceeded"
    fastchat_code = 40303

    @classmethod
    def for_tokens(
        cls, *, context_length: int, prompt_tokens: int, completion_tokens: int, param: str
    ) -> ContextLengthExceededError:
        """Build the error with OpenAI's wording (chat says messages, completions prompt)."""
        total = prompt_tokens + completion_tokens
        if param == "messages":
            split = f"{prompt_tokens} in the messages, {completion_tokens} in the completion"
            advice = "Please reduce the length of the messages or completion."
        else:
            split = f"{prompt_tokens} in your prompt; {completion_tokens} for the completion"
            advice = "Please reduce your prompt; or completion length."
        return cls(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {total} tokens ({split}). {advice}",
            param=param,
        )


class AuthenticationError(ChatgateError):
    """No API key, or one that is not accepted."""

    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"
    fastchat_code = 40101


class PermissionDeniedError(ChatgateError):
    """An accepted key that may not use this endpoint."""

    status = 403
    type = "invalid_request_error"
    default_code = "permission_denied"
    fastchat_code = 40101


class ModelNotFoundError(ChatgateError):
    """The requested model is not served here."""

    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"
    fastchat_code = 40301

    @classmethod
    def for_model(cls, model: str) -> ModelNotFoundError:
        """Build the error with OpenAI's wording."""
        return cls(f"The model `{model}` does not exist or you do not have access to it.", param="model")


class InsufficientMemoryError(ChatgateError):
    """Loading a model or adapter would need more memory than the machine has free now."""

    # 409 Conflict, not 400: the request is well formed and would succeed once another model is
    # unloaded (RFC 9110: a conflict with the current state that the caller may resolve and
    # resubmit). Not 413 (that is the body's size) nor 507 (the issue asks for a 4xx, and
    # Ollama's and vLLM's users read a 5xx as the server's fault, not as "free memory first").
    status = 409
    type = "invalid_request_error"
    default_code = "insufficient_memory"
    fastchat_code = 40901


class RequestTooLargeError(ChatgateError):
    """The request body is over the configured size cap."""

    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"
    fastchat_code = 40302


class OverloadedError(ChatgateError):
    """The worker's queue is full; try again shortly."""

    status = 429
    type = "rate_limit_error"
    default_code = "engine_overloaded"
    fastchat_code = 42903

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class RateLimitExceededError(ChatgateError):
    """A per-key limit (requests or tokens per minute, parallel requests) is reached."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    fastchat_code = 42904

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class NoHealthyWorkerError(ChatgateError):
    """No worker is available for the model right now."""

    status = 503
    type = "server_error"
    default_code = "service_unavailable"
    fastchat_code = 50005

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "2"}


class QueueTimeoutError(NoHealthyWorkerError):
    """The request waited in a worker's queue longer than `--max-queue-wait` without starting."""

    default_code = "queue_timeout"
    fastchat_code = 50006


class RequestTimeoutError(ChatgateError):
    """The request ran past the time its client allowed it (`x-request-timeout`)."""

    status = 504
    type = "timeout_error"
    default_code = "request_timeout"


class WorkerUnavailableError(NoHealthyWorkerError):
    """A worker could not be reached, or failed before its first byte; safe to retry elsewhere."""


class ShuttingDownError(WorkerUnavailableError):
    """This process is shutting down: it takes no new work, and ends the streams still running
    at its shutdown timeout with this error (an API server retries new work elsewhere)."""


class WorkerError(ChatgateError):
    """A worker failed while serving a request."""

    status = 502
    type = "server_error"
    default_code = "worker_error"
    fastchat_code = 50001


class WorkerLostError(WorkerError):
    """The worker's stream broke, or the worker went silent, after it had started answering:
    a stream the client is reading cannot move, but a response not yet sent can start again on
    another worker."""


_BY_FASTCHAT_CODE: dict[int, type[ChatgateError]] = {
    40001: InvalidRequestError,
    40101: AuthenticationError,
    40102: AuthenticationError,
    40301: ModelNotFoundError,
    40302: InvalidRequestError,
    40303: ContextLengthExceededError,
    40901: InsufficientMemoryError,
    42901: OverloadedError,
    42902: OverloadedError,
    42903: OverloadedError,
    50005: NoHealthyWorkerError,
    50006: QueueTimeoutError,
}


def from_fastchat_code(code: int, message: str, *, param: str | None = None) -> ChatgateError:
    """Turn a worker-protocol error code and message back into a chatgate error."""
    cls = _BY_FASTCHAT_CODE.get(code, WorkerError)
    return cls(message, param=param)


class StartupError(ValueError):
    """A problem the operator can fix (a path, a model file, a flag): at start it stops the
    process with one line naming it, not a traceback (`lifespan.OneLineStartupFailure`). A
    `ValueError`, as the checks that raise it were; any other `ValueError` is a bug's, and keeps
    its traceback."""
