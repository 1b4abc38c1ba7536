"""Seeded number-dense texts for the PII equivalence check (tests/privacy/test_pii_equivalence.py).

What makes the checks and the candidate loop work hardest: digit groups in every layout
and separator, Luhn-valid and invalid cards, IBANs with good and bad checksums, phone
shapes with and without keywords, ISBNs, versions, IPs, dates, Unicode look-alikes. Plain
``random.Random(seed)``: the same texts on every CPython 3 and every machine.
"""

from __future__ import annotations

import random

SEPARATORS = (" ", "-", ".", "/", "_", "  ", " - ", " / ", "\t", "--", ". ")
KEYWORDS = ("call", "tel", "phone", "card", "visa", "ssn", "SSN", "dob", "born", "DOB:", "IBAN", "ISBN",
            "order #", "ref", "ip", "contact", "Tel.", "number", "paid with", "birth", "pan", "fax", "")
WORDS = ("and", "or", "the", "at", "room", "floor", "x", "ext", "#", "v", "page", "id", "to", "(", ")", ",",
         ";", ":", "+", "00", "0", "=", "key", "password=", "Bearer", "2nd", "Main St", "Ave")


def luhn_complete(prefix: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(prefix + "0")):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return prefix + str((10 - total % 10) % 10)


def iban(rng: random.Random) -> str:
    country, length = rng.choice((("DE", 22), ("GB", 22), ("FR", 27), ("NL", 18), ("IT", 27), ("BE", 16)))
    bban = "".join(rng.choice("0123456789") for _ in range(length - 4))
    if country == "GB":
        bban = "NWBK" + bban[4:]
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    check = 98 - int(numeric) % 97
    value = f"{country}{check:02d}{bban}"
    if rng.random() < 0.4:
        value = " ".join(value[i:i + 4] for i in range(0, len(value), 4))
    if rng.random() < 0.2:
        value = value[:-1] + rng.choice("0123456789")  # often a bad checksum
    return value


def groups(rng: random.Random, digits: str, sizes: list[int], sep: str | None = None) -> str:
    out, position = [], 0
    for size in sizes:
        out.append(digits[position:position + size])
        position += size
    parts = [p for p in out if p]
    if sep is not None:
        return sep.join(parts)
    text = parts[0]
    for part in parts[1:]:
        text += rng.choice(SEPARATORS) + part
    return text


def card(rng: random.Random) -> str:
    length = rng.choice((12, 13, 14, 15, 16, 16, 16, 17, 18, 19))
    prefix = rng.choice("1234567890") + "".join(rng.choice("0123456789") for _ in range(length - 2))
    digits = luhn_complete(prefix) if rng.random() < 0.7 else prefix + rng.choice("0123456789")
    layout = rng.choice(("4", "465", "spread1", "spread2", "spread3", "run", "mixed"))
    if layout == "run":
        return digits
    if layout == "4":
        sizes = [4] * (length // 4) + ([length % 4] if length % 4 else [])
    elif layout == "465":
        sizes = [4, 6, length - 10]
    elif layout.startswith("spread"):
        size = int(layout[-1])
        sizes = [size] * (length // size) + ([length % size] if length % size else [])
    else:
        sizes = []
        while sum(sizes) < length:
            sizes.append(rng.randint(1, 6))
    sep = rng.choice(SEPARATORS) if rng.random() < 0.8 else None
    return groups(rng, digits, sizes, sep)


def phone(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return f"{rng.randint(2, 9)}{rng.randint(0, 99):02d}-{rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"
    if kind == 1:
        return f"({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}"
    if kind == 2:
        cc = rng.choice(("1", "44", "49", "33", "55", "27", "91", "86", "353", "7", "380", "999"))
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(6, 12)))
        sizes: list[int] = []
        while sum(sizes) < len(digits):
            sizes.append(rng.randint(1, 4))
        return rng.choice(("+", "+ ", "00", "00 ")) + cc + rng.choice((" ", "-", "")) + groups(rng, digits, sizes)
    if kind == 3:
        return "0" + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 4))) + " " + \
            "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8)))
    if kind == 4:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(7, 16)))
    if kind == 5:
        return phone(rng) + rng.choice((" x12", " ext. 7", " #3", "/", " 12", " 00000000", "/+14155550199"))
    return groups(rng, "".join(rng.choice("0123456789") for _ in range(20)),
                  [rng.randint(1, 5) for _ in range(rng.randint(2, 6))])


def number(rng: random.Random) -> str:
    kind = rng.randrange(10)
    digits = "".join(rng.choice("0123456789") for _ in range(30))
    if kind == 0:
        return f"{rng.randint(0, 999):03d}{rng.choice(('-', ' ', '.', '_', ''))}{rng.randint(0, 99):02d}" \
               f"{rng.choice(('-', ' ', '.', '_', ''))}{rng.randint(0, 9999):04d}"  # SSN-like
    if kind == 1:
        return ".".join(str(rng.choice((rng.randint(0, 255), rng.randint(0, 999), "01"))) for _ in range(4))
    if kind == 2:
        hextets = ("", "fe80", "1", "db8", "2001", "0", "ffff", "a")
        return ":".join(rng.choice(hextets) for _ in range(rng.randint(2, 8)))
    if kind == 3:
        sep = rng.choice("/.-")
        day, month = rng.randint(0, 32), rng.randint(0, 13)
        year = rng.choice((rng.randint(1870, 2030), rng.randint(0, 99)))
        return f"{day}{sep}{month}{sep}{year}"
    if kind == 4:
        return f"978-{digits[0]}-{digits[1:4]}-{digits[4:9]}-{digits[9]}"  # ISBN
    if kind == 5:
        return digits[:rng.randint(1, 25)]
    if kind == 6:
        return f"{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 300)}"  # version
    if kind == 7:
        return iban(rng)
    if kind == 8:
        return f"{rng.randint(1, 9999)} {rng.choice(('Main', 'Oak', 'N Elm', '5th'))} {rng.choice(('St', 'Ave', 'Rd'))}"
    return groups(rng, digits, [rng.randint(1, 6) for _ in range(rng.randint(2, 7))])


TRICKS = ("\u200b", "\uff11", "\uff10", "\u00a0", "\u2013", "\u0660", "é", "\u202e")


def dense_text(rng: random.Random, size: int) -> str:
    parts: list[str] = []
    length = 0
    while length < size:
        pick = rng.random()
        if pick < 0.2:
            token = card(rng)
        elif pick < 0.4:
            token = phone(rng)
        elif pick < 0.7:
            token = number(rng)
        elif pick < 0.85:
            token = rng.choice(KEYWORDS)
        else:
            token = rng.choice(WORDS)
        if rng.random() < 0.03:
            spot = rng.randint(0, len(token))
            token = token[:spot] + rng.choice(TRICKS) + token[spot:]
        parts.append(token)
        parts.append(rng.choice((" ", " ", " ", "  ", "\n", ", ", "; ", "/", "-", "", ": ")))
        length += len(token) + 1
    return "".join(parts)


def dense_texts(seed: int, count: int, size: int = 160) -> list[str]:
    rng = random.Random(seed)
    return [dense_text(rng, rng.randint(size // 4, size * 2)) for _ in range(count)]


def card_layouts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        before = rng.choice(("card ", "pay ", "", "visa: ", "order ", "call ", "x"))
        after = rng.choice(("", ".", " exp 12/27", " 415-555-0132", "-1", " 12", "0"))
        out.append(before + card(rng) + after)
    return out
