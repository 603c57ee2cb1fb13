"""Errors that carry a message a client may read.

Every layer raises these; one function per API (see ``deployments/errors.py``)
turns them into HTTP answers. Anything that is not a ``CorralError`` is a
server fault and reaches the client only as a generic 5xx.

They cross Ray process boundaries (actor calls, Serve handles), so they pickle
with their attributes intact.
"""

from __future__ import annotations

from typing import Any, ClassVar


def _rebuild(cls: type[CorralError], message: str, state: dict[str, Any]) -> CorralError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class CorralError(Exception):
    """Base class: a failure whose message is safe and useful to show a client."""

    #: What kind of failure this is; the API layers map it to a status code.
    kind: ClassVar[str] = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.__dict__))


class InvalidRequest(CorralError):
    """The request is well-formed JSON but asks for something we cannot do."""

    kind = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    """The prompt (plus what must be generated) does not fit the context window."""

    kind = "context_length_exceeded"

    def __init__(self, n_prompt: int, n_ctx: int, *, param: str | None = None) -> None:
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens, but the prompt has "
            f"{n_prompt} tokens. Shorten the prompt, or load the model with a larger "
            f"context length.",
            param=param,
        )
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx


class ModelNotFound(CorralError):
    """No model of that name exists in this Corral."""

    kind = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist. List the available models with GET /v1/models.",
            param="model",
        )
        self.model = model


class ModelLoadFailed(CorralError):
    """The model exists but its engine could not be started (corrupt file, no memory)."""

    kind = "model_load_failed"


class ServiceUnavailable(CorralError):
    """A transient condition: the replica died, the model is still loading, no room ...

    ``retry_after`` (seconds) becomes a Retry-After header when a retry may work.
    """

    kind = "unavailable"

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after


class ModelCrashed(ServiceUnavailable):
    """The model's process died while serving the request, and again where it was retried."""

    kind = "model_crashed"


class ModelFailed(ServiceUnavailable):
    """The model's placement kept crashing and was given up on until its back-off ends."""

    kind = "model_failed"


class Overloaded(CorralError):
    """Every replica of the model holds as many requests as it may: retry a little later."""

    kind = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PullFailed(CorralError):
    """A download (from a registry, a URL or the head) failed or brought the wrong bytes.

    The fault is upstream or on the way; the store is left as it was, apart from a
    partial file that the next pull of the same blob resumes from.
    """

    kind = "pull_failed"
