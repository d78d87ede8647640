"""Errors the engine hands to the consumer of one request (the others keep running)."""

from __future__ import annotations


class RequestFailedError(RuntimeError):
    """One request could not continue (e.g. the model produced NaN/inf logits for it); it was aborted.

    Only this request ended: the others in the same batch run on. `reason` says why, for the client.
    """

    def __init__(self, request_id: str, reason: str) -> None:
        super().__init__(f"request {request_id!r} failed: {reason}")
        self.request_id = request_id
        self.reason = reason
