"""Exceptions reach the log only PII-masked, through structlog and through stdlib loggers."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from gateway.observability.logging import configure_logging

QUOTED = "could not convert string to float: 'john.doe@example.com 078-05-1120'"


@pytest.fixture
def production_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    try:
        yield
    finally:
        root.handlers = handlers
        root.setLevel(level)
        structlog.configure(**config)


def _raise() -> None:
    raise ValueError(QUOTED)


def test_traceback_of_a_logged_exception_is_masked(production_logging: None, capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    """s8 probe: ``format_exc_info`` ran after the redactor, so the rendered traceback (an
    exception quoting the input that caused it) reached the log line unmasked; and stdlib
    records (aiohttp's "Error handling request", asyncio, grpc) were never masked at all."""
    logging.getLogger().handlers = []  # as in production: pytest's capture handlers are not there
    configure_logging("info")
    for logger in (structlog.get_logger("gateway.test"), logging.getLogger("aiohttp.server")):
        try:
            _raise()
        except ValueError:
            logger.exception("internal_error")
    err = capsys.readouterr().err
    assert err.count("ValueError: could not convert") == 2, err
    assert "john.doe" not in err and "078-05-1120" not in err
    assert err.count("[EMAIL] [SSN]") == 2
