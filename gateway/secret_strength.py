"""Whether a secret an operator configured is strong enough to rely on.

A length floor alone lets through 32 bytes of "a", "password" four times or a keyboard
walk: an HS256 secret like that is found by an offline guess of any token it signed
(RFC 8725 §3.5: human-memorable passwords must not be used as keys). Text secrets are
judged by zxcvbn (Dropbox's estimator: dictionaries, repeats, sequences, keyboard walks,
dates) rather than by a character-class rule, which "Password1!Password1!Password1!!"
passes. Binary key files (os.urandom output) are only checked for being random at all.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Final

from zxcvbn import zxcvbn  # type: ignore[import-untyped]  # ships no type information

MIN_SECRET_BYTES: Final = 32
# Estimated guesses a text secret must take, in bits. 32 random hex digits (128 bits)
# score ~105, 43 random URL-safe base64 characters (256 bits) ~142; a 32-byte passphrase
# of four words ~82, "MySuperSecretPassword2026!!!!!!!" ~62.
MIN_GUESS_BITS: Final = 100
# zxcvbn refuses longer passwords (its matching is quadratic); a longer secret is judged
# in chunks of this size, distinct chunks' estimates added up.
_CHUNK: Final = 72
_MAX_CHUNKS: Final = 8
_HOW_TO_MAKE: Final = "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def text_secret_problem(secret: bytes) -> str | None:
    """Why ``secret`` (a shared secret typed or pasted as text) must not be used, or None.

    The answer never contains the secret, nor anything derived from it beyond a length
    and an estimate of guesses.
    """
    if len(secret) < MIN_SECRET_BYTES:
        return f"a secret of at least {MIN_SECRET_BYTES} bytes is needed; {_HOW_TO_MAKE}"
    bits = _guess_bits(secret)
    if bits < MIN_GUESS_BITS:
        # SECURITY: a long but guessable secret is refused like a short one: it signs tokens
        # anyone could forge after an offline dictionary run over one captured token.
        return (f"the secret is guessable (an estimated {bits:.0f} bits; at least {MIN_GUESS_BITS} needed: "
                f"no words, repeats, sequences or keyboard walks); {_HOW_TO_MAKE}")
    return None


def raw_key_problem(key: bytes) -> str | None:
    """Why ``key`` (raw key bytes from a key file) is not random, or None.

    Key files hold raw bytes (os.urandom), not text. Random bytes are printable ASCII
    only with probability (95/256)^n: 1.6e-14 for the 32 bytes generated here, 1.3e-7
    for a 16-byte key. They repeat little: fewer than half distinct is far less likely
    still. Text typed or pasted into a key file ("aaaa...", hex digits, a password) and
    filler (zeros, a repeated pair) fail one or the other.
    """
    if key and all(0x20 <= b < 0x7F or b in b"\t\r\n" for b in key):
        return "the key file holds text, not random bytes (generated keys are raw bytes)"
    if len(set(key)) * 2 < len(key):
        return "the key file does not hold random bytes (too few distinct byte values)"
    return None


@lru_cache(maxsize=32)
def _guess_bits(secret: bytes) -> float:
    """zxcvbn's estimate in bits; cached (every policy reload judges the same secrets, at
    5-50 ms each; the cache holds nothing the issuer's key table does not)."""
    text = secret.decode("utf-8", errors="replace")
    chunks = list(dict.fromkeys(text[i:i + _CHUNK] for i in range(0, len(text), _CHUNK)))[:_MAX_CHUNKS]
    return sum(float(zxcvbn(chunk)["guesses_log10"]) for chunk in chunks) * math.log2(10)
