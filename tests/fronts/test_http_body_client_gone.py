"""A client that leaves mid-body gets a refusal (400 body_incomplete), never an internal error.

Found by security_tests/test_protection_off.py: with body_timeout_s raised, a slow sender that
gave up surfaced as ConnectionResetError from the body read and was answered 500 with a
traceback in the log.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.http_exceptions import ContentLengthError
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.errors import MalformedRequest
from gateway.fronts.http.body import read_body


class _Gone:
    """A request body stream whose connection is lost after ``good`` pieces."""

    def __init__(self, exc: Exception, good: int = 0) -> None:
        self.exc = exc
        self.good = good

    async def read(self, n: int = -1) -> bytes:
        if self.good:
            self.good -= 1
            return b"{" * 16
        raise self.exc


def _request(stream: _Gone, **headers: str) -> web.Request:
    hdrs = CIMultiDict({"Content-Length": "1048576", "Content-Type": "application/json", **headers})
    return make_mocked_request("POST", "/v2/models/m/infer", headers=hdrs, payload=cast(Any, stream))


@pytest.mark.parametrize("exc", [ConnectionResetError("Connection lost"), ContentLengthError("short body")],
                         ids=["reset", "short"])
@pytest.mark.parametrize(("coding", "good"), [("identity", 0), ("identity", 2), ("gzip", 0)],
                         ids=["plain_at_once", "plain_after_data", "gzip"])
async def test_lost_connection_is_a_400_body_incomplete(exc: Exception, coding: str, good: int) -> None:
    request = _request(_Gone(exc, good), **{"Content-Encoding": coding})
    with pytest.raises(MalformedRequest) as err:
        await read_body(request, max_bytes=8 * 1024 * 1024)
    assert err.value.http_status == 400
    assert err.value.reason == "body_incomplete"
    assert err.value.__cause__ is exc


async def test_other_errors_are_not_swallowed() -> None:
    """Only a lost connection is the client's doing; anything else stays an error of ours."""
    request = _request(_Gone(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        await read_body(request, max_bytes=8 * 1024 * 1024)
