"""Seeded pairs of a number-like value and a phone, for tests/privacy/test_pii_adjacent_phone.py.

Every entity or entity-like number the PII engine knows (dates, dates of birth after a
keyword, SSNs, cards, IBANs, IPv4 addresses, versions, years, plain numbers, order ids)
right before or right after a phone in a common national or international format, joined
by the separators people write between two values. Plain ``random.Random(seed)``: the same
texts on every CPython 3 and every machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import NamedTuple

from tests.support.pii_texts import iban, luhn_complete

JOINS = (" ", ", ", "; ", "/", " - ", "\t", "(", "")


class Pair(NamedTuple):
    text: str
    kind: str  # the neighbour's kind, e.g. "date"
    phone_first: bool
    phone: tuple[int, int]  # the phone's span in ``text``
    alone: str  # the phone in the same words without its neighbour


def _d(rng: random.Random, count: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(count))


def _date(rng: random.Random) -> str:
    day, month, year = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1930, 2024)
    return rng.choice((
        f"{day:02d}/{month:02d}/{year}", f"{year}-{month:02d}-{day:02d}", f"{day:02d}.{month:02d}.{year}",
        f"{month}/{day}/{year % 100:02d}", f"{month:02d}-{day:02d}-{year}", f"{day}/{month}/{year}",
        f"Jan {day}, {year}", f"{day} March {year}",
    ))


def _dob(rng: random.Random) -> str:
    return rng.choice(("dob ", "DOB: ", "born ", "date of birth ", "birthday ")) + _date(rng)


def _ssn(rng: random.Random) -> str:
    return f"{rng.randint(100, 665):03d}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"


def _card(rng: random.Random) -> str:
    number = luhn_complete(rng.choice("3456") + _d(rng, 14))
    separator = rng.choice((" ", "-", ""))
    return separator.join(number[i:i + 4] for i in range(0, 16, 4)) if separator else number


def _ipv4(rng: random.Random) -> str:
    return ".".join(str(rng.randint(1, 254)) for _ in range(4))


def _version(rng: random.Random) -> str:
    return rng.choice(("v", "", "version ", "python ")) + ".".join(
        str(rng.randint(0, 20)) for _ in range(rng.choice((2, 3, 3, 4))))


def _year(rng: random.Random) -> str:
    return rng.choice(("", "in ", "since ")) + str(rng.randint(1950, 2030))


def _number(rng: random.Random) -> str:
    return rng.choice((str(rng.randint(0, 9)), str(rng.randint(10, 999)), _d(rng, 5), _d(rng, 7),
                       f"{rng.randint(1, 999)}.{rng.randint(0, 99)}", f"{rng.randint(1, 99)},{_d(rng, 3)}"))


def _order(rng: random.Random) -> str:
    return rng.choice((f"#{_d(rng, 5)}", f"order {_d(rng, 6)}", f"ORD-{rng.randint(2020, 2026)}-{_d(rng, 6)}",
                       f"A{_d(rng, 2)}-{_d(rng, 4)}", f"INV-{_d(rng, 5)}", f"ticket {_d(rng, 4)}-{_d(rng, 3)}"))


NEIGHBOURS: dict[str, Callable[[random.Random], str]] = {
    "date": _date, "dob": _dob, "ssn": _ssn, "card": _card, "iban": iban, "ipv4": _ipv4,
    "version": _version, "year": _year, "number": _number, "order": _order,
}


def phone(rng: random.Random) -> str:
    """A phone in one of the common national or international formats."""
    area, exchange, line = rng.randint(201, 989), rng.randint(200, 999), _d(rng, 4)
    return rng.choice((
        f"{area}-{exchange}-{line}", f"({area}) {exchange}-{line}", f"{area}.{exchange}.{line}",
        f"{area} {exchange} {line}", f"1-{area}-{exchange}-{line}", f"+1 {area} {exchange} {line}",
        f"+1-{area}-{exchange}-{line}", f"+1{area}{exchange}{line}", f"+1 ({area}) {exchange}-{line}",
        f"+44 20 {rng.randint(7000, 7999)} {line}", f"020 {rng.randint(7000, 7999)} {line}",
        f"+44 7{_d(rng, 3)} {_d(rng, 6)}", f"07{_d(rng, 3)} {_d(rng, 6)}",
        f"0{rng.randint(1, 5)} {_d(rng, 2)} {_d(rng, 2)} {_d(rng, 2)} {_d(rng, 2)}",
        f"+33 {rng.randint(1, 7)} {_d(rng, 2)} {_d(rng, 2)} {_d(rng, 2)} {_d(rng, 2)}",
        f"+49 30 {_d(rng, 8)}", f"030 {_d(rng, 8)}", f"0044 20 {rng.randint(7000, 7999)} {line}",
        f"+61 2 {_d(rng, 4)} {_d(rng, 4)}", f"+81 3-{_d(rng, 4)}-{_d(rng, 4)}",
        f"(02) {_d(rng, 4)} {_d(rng, 4)}", f"(11) 9{_d(rng, 4)}-{_d(rng, 4)}",
    ))


def phone_pairs(seed: int, join: str, per_kind: int = 60) -> list[Pair]:
    """``per_kind`` texts per neighbour kind and order, neighbour and phone joined by ``join``."""
    rng = random.Random(seed)
    out: list[Pair] = []
    for kind, make in NEIGHBOURS.items():
        for phone_first in (False, True):
            for _ in range(per_kind):
                prefix = rng.choice(("", "", "see ", "call ", "ref "))
                suffix = rng.choice(("", " now", ".", " thanks"))
                neighbour, number = make(rng), phone(rng)
                if phone_first:
                    text = f"{prefix}{number}{join}{neighbour}{suffix}"
                    start = len(prefix)
                else:
                    text = f"{prefix}{neighbour}{join}{number}{suffix}"
                    start = len(prefix) + len(neighbour) + len(join)
                out.append(Pair(text, kind, phone_first, (start, start + len(number)),
                                f"{prefix}{number}{suffix}"))
    return out
