"""The secret-strength checks on their own: what passes, what is refused, what is said."""

from __future__ import annotations

import os
import secrets
import string

import pytest

from gateway.secret_strength import MIN_GUESS_BITS, raw_key_problem, text_secret_problem


@pytest.mark.parametrize("secret", [
    secrets.token_urlsafe(32), secrets.token_hex(32), secrets.token_hex(16),
    "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32)),
    secrets.token_urlsafe(200),  # longer than zxcvbn takes in one piece
])
def test_random_text_secrets_pass(secret: str) -> None:
    assert text_secret_problem(secret.encode()) is None


@pytest.mark.parametrize("secret", ["", "x", "a" * 31, secrets.token_hex(15)])
def test_short_secrets_are_refused_by_length(secret: str) -> None:
    problem = text_secret_problem(secret.encode())
    assert problem is not None and "at least 32 bytes" in problem


@pytest.mark.parametrize("secret", [
    "a" * 32, "password" * 4, "abcdefghijklmnopqrstuvwxyz012345", "0123456789abcdef" * 2,
    "qwertyuiopasdfghjklzxcvbnm123456", "correct horse battery staple now",
    "MySuperSecretPassword2026!!!!!!!", "changeme" * 40,
    # a long secret made of one short random piece repeated: judged by its distinct chunks
    secrets.token_hex(4) * 40,
])
def test_guessable_secrets_are_refused_without_being_quoted(secret: str) -> None:
    problem = text_secret_problem(secret.encode())
    assert problem is not None and "guessable" in problem and f"at least {MIN_GUESS_BITS}" in problem
    assert secret[:16] not in problem


def test_non_utf8_secret_is_judged_not_crashed() -> None:
    assert text_secret_problem(os.urandom(48)) is None
    assert text_secret_problem(b"\xff" * 48) is not None


@pytest.mark.parametrize("size", [16, 24, 32, 64])
def test_random_key_bytes_pass(size: int) -> None:
    assert all(raw_key_problem(os.urandom(size)) is None for _ in range(200))


@pytest.mark.parametrize("key", [bytes(32), b"a" * 32, b"0123456789abcdef" * 2, b"\x01\x02" * 16,
                                 b"correct horse battery staple now\n", secrets.token_hex(16).encode()])
def test_non_random_key_bytes_are_refused(key: bytes) -> None:
    assert raw_key_problem(key) is not None
