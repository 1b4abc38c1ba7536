"""What replaces a detected entity: Presidio's operator split, typed and keyed.

Each operator turns one span of the *original* text into its replacement. ``partial``
is set when the span is only a piece of an entity (an entity split across tensor
elements): keep-last masking then keeps nothing, so pieces cannot add up to a leak.

Replacements are built from ``[``, ``]``, ``:``, ASCII upper-case tags and the letters
``a``-``p`` only, so no recognizer matches them again: masking is idempotent and a
token survives a round trip through the model untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import ClassVar, Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privacy.pii.normalize import skeleton
from privacy.pii.recognizers import CARD, EMAIL, IBAN, IP, PHONE, SSN

# Hex digits spelt with the letters a-p: binary rendered this way never contains a digit
# run, an "@" or a key prefix a recognizer could pick up again.
_TO_LETTERS: Final = str.maketrans("0123456789abcdef", "abcdefghijklmnop")
_FROM_LETTERS: Final = str.maketrans("abcdefghijklmnop", "0123456789abcdef")

MIN_HMAC_KEY_BYTES: Final = 32
TOKEN_KEY_SIZES: Final = (16, 24, 32)
_PSEUDONYM_CONTEXT: Final = b"infergate/pii-pseudonym/v1\x00"
# v2: the tenant is part of the associated data (v1 tokens, bound to the type only, no
# longer authenticate).
_TOKEN_CONTEXT: Final = b"infergate/pii-token/v2\x00"
_NONCE_BYTES: Final = 12
# SECURITY: a token is parsed by a pattern without nested quantifiers over a bounded tag.
TOKEN_RE: Final = re.compile(r"\[([A-Z][A-Z_]{0,15}):tok:([a-p]{2,})\]")


def to_letters(data: bytes) -> str:
    return data.hex().translate(_TO_LETTERS)


def from_letters(text: str) -> bytes:
    return bytes.fromhex(text.translate(_FROM_LETTERS))


class Operator(Protocol):
    """Turns one detected span into its replacement; built once per policy revision."""

    name: ClassVar[str]

    def apply(self, entity: str, value: str, *, partial: bool = False) -> str: ...


@dataclass(frozen=True, slots=True)
class Redact:
    """Removes the value (Presidio's ``redact``)."""

    name: ClassVar[str] = "redact"

    def apply(self, entity: str, value: str, *, partial: bool = False) -> str:
        return ""


@dataclass(frozen=True, slots=True)
class Replace:
    """Writes a type tag, ``[EMAIL]`` by default."""

    name: ClassVar[str] = "replace"
    tag: str | None = None

    def apply(self, entity: str, value: str, *, partial: bool = False) -> str:
        return self.tag if self.tag is not None else f"[{entity}]"


@dataclass(frozen=True, slots=True)
class Mask:
    """Masks letters and digits, keeping the last ``keep_last`` (card-receipt style).

    Works on the detection form of the value, so invisible or look-alike characters do
    not survive, and keeps separators so the shape stays readable.
    """

    name: ClassVar[str] = "mask"
    keep_last: int = 4
    char: str = "*"

    def __post_init__(self) -> None:
        if not 0 <= self.keep_last <= 8 or len(self.char) != 1 or self.char.isalnum():
            raise ValueError("mask needs 0 <= keep_last <= 8 and one non-alphanumeric masking character")

    def apply(self, entity: str, value: str, *, partial: bool = False) -> str:
        folded = skeleton(value)
        positions = [i for i, ch in enumerate(folded) if ch.isalnum()]
        # SECURITY: never reveal more than half of a value (an IPv4 address has 4-12
        # digits), and nothing of a piece of a split entity.
        keep = 0 if partial else min(self.keep_last, len(positions) // 2)
        keep_from = positions[-keep] if keep else len(folded)
        return "".join(
            ch if i >= keep_from or not ch.isalnum() else self.char for i, ch in enumerate(folded)
        )


_EMAIL_AT: Final = re.compile(r"[ \t]?(?:%40|&#0*64;|&#x0*40;|&commat;|[\[({<][ \t]?at[ \t]?[\])}>])[ \t]?",
                              re.IGNORECASE)
_EMAIL_DOT: Final = re.compile(r"[ \t]?(?:%2e|&#0*46;|[\[({<][ \t]?dot[ \t]?[\])}>])[ \t]?", re.IGNORECASE)


def canonical(entity: str, value: str) -> str:
    """One spelling per real-world value, so pseudonyms link across formats."""
    folded = skeleton(value)
    if entity in (CARD, SSN):
        return "".join(ch for ch in folded if ch.isdigit())
    if entity == PHONE:
        digits = "".join(ch for ch in folded.split("x")[0].split("ext")[0] if ch.isdigit())
        if folded.lstrip().startswith("00"):
            digits = digits[2:]
        return digits[1:] if len(digits) == 11 and digits.startswith("1") else digits
    if entity == IBAN:
        return "".join(ch for ch in folded if ch.isalnum()).upper()
    if entity == EMAIL:
        # SECURITY: bounded value, patterns without nested quantifiers.
        return _EMAIL_DOT.sub(".", _EMAIL_AT.sub("@", folded)).strip().casefold()
    if entity == IP:
        try:
            return ipaddress.ip_address(folded.strip().split("%")[0]).compressed
        except ValueError:
            return folded.strip().lower()
    return folded.strip()


@dataclass(frozen=True, slots=True)
class HmacPseudonym:
    """A keyed HMAC-SHA256 pseudonym: the same value gives the same tag under one key.

    Linkable (counting, joining) but not reversible; without the key a pseudonym cannot
    be confirmed by hashing guesses, which a plain hash of a phone number would allow.
    """

    name: ClassVar[str] = "hash"
    key: bytes = field(repr=False)
    length: int = 10  # bytes of the MAC kept: 80 bits, 20 letters

    def __post_init__(self) -> None:
        if len(self.key) < MIN_HMAC_KEY_BYTES:
            raise ValueError(f"the pseudonym key must be at least {MIN_HMAC_KEY_BYTES} bytes")
        if not 8 <= self.length <= 32:
            raise ValueError("pseudonym length must be 8..32 bytes")

    def apply(self, entity: str, value: str, *, partial: bool = False) -> str:
        message = _PSEUDONYM_CONTEXT + entity.encode() + b"\x00" + canonical(entity, value).encode(
            "utf-8", "surrogateescape")
        digest = hmac.new(self.key, message, hashlib.sha256).digest()
        return f"[{entity}:{to_letters(digest[:self.length])}]"


@dataclass(frozen=True, slots=True)
class AesGcmTokenizer:
    """Reversible tokens: AES-GCM with a random 96-bit nonce; tenant and type as AAD.

    Only a holder of the key can turn a token back into the value (:meth:`reveal`);
    the gateway gives tokens to roles holding ``pii:unmask``. A random nonce keeps equal
    values unlinkable; rotate the key well before 2**32 tokens (NIST SP 800-38D 8.3).

    SECURITY: the tenant the token was minted for is authenticated with it, so one key
    serves every tenant and a token of tenant A does not open under tenant B
    (:meth:`for_tenant`); likewise a token's type tag cannot be edited.
    """

    name: ClassVar[str] = "tokenize"
    key: bytes = field(repr=False)
    tenant: str = ""
    _aead: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.key) not in TOKEN_KEY_SIZES:
            raise ValueError("the token key must be 16, 24 or 32 bytes (AES-128/192/256)")
        object.__setattr__(self, "_aead", AESGCM(self.key))

    def for_tenant(self, tenant: str) -> AesGcmTokenizer:
        """The same key, minting and opening tokens bound to ``tenant``."""
        return self if tenant == self.tenant else AesGcmTokenizer(self.key, tenant)

    def _aad(self, entity: str) -> bytes:
        # Length-prefixed tenant: no two (tenant, type) pairs give the same bytes.
        tenant = self.tenant.encode("utf-8", "surrogateescape")
        return _TOKEN_CONTEXT + len(tenant).to_bytes(4, "big") + tenant + entity.encode()

    def apply(self, entity: str, value: str, *, partial: bool = False) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, value.encode("utf-8", "surrogateescape"), self._aad(entity))
        return f"[{entity}:tok:{to_letters(nonce + sealed)}]"

    def reveal(self, token: str) -> tuple[str, str]:
        """(entity, value) of a token made with this key; ValueError for anything else."""
        match = TOKEN_RE.fullmatch(token)
        if match is None or len(match.group(2)) % 2:
            raise ValueError("not a PII token")
        entity, blob = match.group(1), from_letters(match.group(2))
        if len(blob) < _NONCE_BYTES + 16:
            raise ValueError("not a PII token")
        try:
            plain = self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], self._aad(entity))
        except InvalidTag as exc:
            raise ValueError("token does not authenticate under this key and tenant") from exc
        return entity, plain.decode("utf-8", "surrogateescape")

    def unmask(self, text: str) -> str:
        """Replace every token of this key in ``text`` by its value; others stay as they are."""

        def one(match: re.Match[str]) -> str:
            try:
                return self.reveal(match.group(0))[1]
            except ValueError:
                return match.group(0)

        return TOKEN_RE.sub(one, text)


OPERATOR_NAMES: Final = ("redact", "replace", "mask", "hash", "tokenize")
