"""Deterministic labelled PII corpus for ``bench/bench_pii.py`` (seeded Faker).

Writes ``bench/data/pii_corpus.jsonl``: one JSON object per line,
``{"id", "variant", "text", "entities": [{"type", "start", "end"}]}`` with character
offsets. Entity values come from Faker (several locales) and libphonenumber example
numbers, not from the gateway's recognizers, so the labels do not know our rules.

Variants:
- ``plain``: one to three entities in template sentences with Faker filler;
- ``negative``: hard negatives only (Luhn failures, bad IBAN checksums, version strings
  shaped like IPs, invalid SSNs, dates without a birth keyword, UUIDs, hashes, ISBNs...);
- ``evasion``: a plain entity hidden with zero-width characters, fullwidth digits,
  Cyrillic/Greek homoglyphs or percent/HTML encodings;
- ``adjacent``: two or three cards, phones, SSNs and IBANs in a row, joined by a space, a
  slash, a comma... (issue 5: a card right after a phone was left in clear). Appended
  after the others from their own seed, so the first ``--n`` rows do not change.

    .venv/bin/python bench/pii_corpus.py [--n 2400] [--adjacent 200] [--seed 20261202] \
        [--out bench/data/pii_corpus.jsonl]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import phonenumbers
from faker import Faker
from faker.providers.date_time import change_year

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "data" / "pii_corpus.jsonl"
SEED = 20261202
ADJACENT = 200  # rows of the adjacent variant, after the others
# "Today" for every date Faker draws: its own date helpers read the clock, so the DOB
# values (and so the committed corpus) changed from one day to the next. The day the
# committed corpus was generated.
REFERENCE_DATE = date(2026, 12, 2)

PHONE_LOCALES = ("en_US", "en_US", "en_US", "en_GB", "de_DE", "fr_FR", "it_IT", "es_ES", "nl_NL", "en_IN",
                 "pt_BR", "en_CA", "en_AU", "ja_JP")
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IT", "ES", "NL", "IN", "BR", "CA", "AU", "JP", "MX", "CH", "SE", "PL",
                 "IL", "ZA", "SG", "KR")
IBAN_LOCALES = ("de_DE", "fr_FR", "en_GB", "nl_NL", "es_ES", "it_IT", "pt_PT", "pl_PL", "fr_CH", "nl_BE")
IDN_DOMAINS = ("müller.de", "bücher.example", "пример.рф", "例子.广告", "δοκιμή.gr", "xn--mller-kva.de",
               "café.fr", "straße.de")
IDN_LOCALS = ("josé", "zoë", "用户", "почта", "jürgen", "françois", "ålesund", "søren")


@dataclass
class Builder:
    """Accumulates text and gold spans."""

    parts: list[str] = field(default_factory=list)
    spans: list[dict[str, object]] = field(default_factory=list)
    length: int = 0

    def add(self, text: str, entity: str | None = None) -> None:
        if entity is not None:
            self.spans.append({"type": entity, "start": self.length, "end": self.length + len(text)})
        self.parts.append(text)
        self.length += len(text)

    def text(self) -> str:
        return "".join(self.parts)


class Generator:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.fakers: dict[str, Faker] = {}
        for index, locale in enumerate(sorted({*PHONE_LOCALES, *IBAN_LOCALES, "en_US"})):
            fake = Faker(locale)
            fake.seed_instance(seed + index)
            self.fakers[locale] = fake
        self.en = self.fakers["en_US"]

    # --- entity values --------------------------------------------------------------

    def email(self) -> str:
        roll = self.rng.random()
        if roll < 0.1:
            return f"{self.rng.choice(IDN_LOCALS)}@{self.rng.choice(IDN_DOMAINS)}"
        if roll < 0.2:
            return f"{self.en.user_name()}@{self.rng.choice(IDN_DOMAINS)}"
        if roll < 0.4:
            user, domain = self.en.email().split("@")
            return f"{user}+{self.rng.choice(['news', 'work', 'x1', 'shop', 'git'])}@{domain}"
        if roll < 0.55:
            return f"{self.en.first_name()}.{self.en.last_name()}@{self.en.domain_name()}".lower()
        return self.en.email() if roll < 0.8 else self.en.company_email()

    def phone(self) -> str:
        if self.rng.random() < 0.55:
            return str(self.fakers[self.rng.choice(PHONE_LOCALES)].phone_number())
        region = self.rng.choice(PHONE_REGIONS)
        example = phonenumbers.example_number_for_type(region, self.rng.choice(
            [phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE]))
        if example is None:
            example = phonenumbers.example_number(region)
        if example is None:
            return str(self.en.phone_number())
        national = str(example.national_number)
        tail = "".join(self.rng.choice(string.digits) for _ in range(3))
        example.national_number = int(national[:-3] + tail)
        style = self.rng.choice([phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164,
                                 phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.NATIONAL])
        return phonenumbers.format_number(example, style)

    def card(self) -> str:
        number = self.en.credit_card_number()
        separator = self.rng.choice(["", " ", " ", "-", "-", ".", " - "])
        if not separator:
            return number
        if len(number) == 15:
            return separator.join((number[:4], number[4:10], number[10:]))
        return separator.join(number[i:i + 4] for i in range(0, len(number), 4))

    def ssn(self) -> tuple[str, bool]:
        value = self.en.ssn()
        roll = self.rng.random()
        if roll < 0.15:
            return value.replace("-", ""), True  # bare digits: only with a keyword
        if roll < 0.3:
            return value.replace("-", " "), False
        return value, False

    def iban(self) -> str:
        value = str(self.fakers[self.rng.choice(IBAN_LOCALES)].iban())
        if self.rng.random() < 0.5:
            return " ".join(value[i:i + 4] for i in range(0, len(value), 4))
        return value

    def ip(self) -> str:
        roll = self.rng.random()
        if roll < 0.5:
            return self.en.ipv4_public() if self.rng.random() < 0.6 else self.en.ipv4_private()
        if roll < 0.85:
            return self.en.ipv6()
        return self.rng.choice(["::1", "fe80::1", "2001:db8::8a2e:370:7334", "::ffff:192.0.2.128",
                                f"fe80::{self.rng.randrange(0x10000):x}:{self.rng.randrange(0x10000):x}"])

    def secret(self) -> tuple[str, str]:
        """(prefix text, secret value): the value alone is the labelled span."""
        r = self.rng
        alnum = string.ascii_letters + string.digits

        def rand(n: int, alphabet: str = alnum) -> str:
            return "".join(r.choice(alphabet) for _ in range(n))

        kind = r.randrange(10)
        if kind == 0:
            return "aws key ", "AKIA" + rand(16, string.ascii_uppercase + string.digits)
        if kind == 1:
            return "token ", "ghp_" + rand(36)
        if kind == 2:
            return "slack ", f"xoxb-{rand(11, string.digits)}-{rand(12, string.digits)}-{rand(24)}"
        if kind == 3:
            return "stripe ", "sk_live_" + rand(24)
        if kind == 4:
            return "openai ", "sk-proj-" + rand(20) + "T3BlbkFJ" + rand(20)
        if kind == 5:
            header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()).rstrip(b"=")
            body = base64.urlsafe_b64encode(json.dumps({"sub": rand(8), "iat": r.randrange(10**9)}).encode())
            return "jwt ", f"{header.decode()}.{body.rstrip(b'=').decode()}.{rand(43, alnum + '-_')}"
        if kind == 6:
            lines = "\n".join(rand(64, alnum + "+/") for _ in range(3))
            return "key:\n", f"-----BEGIN RSA PRIVATE KEY-----\n{lines}\n-----END RSA PRIVATE KEY-----"
        if kind == 7:
            return "password=", rand(r.randrange(10, 18), alnum + "!#%")
        if kind == 8:
            return "google ", "AIza" + rand(35, alnum + "-_")
        return "Authorization: Bearer ", rand(40, alnum + "-_.")

    def dob(self) -> tuple[str, str]:
        date = self._date_of_birth(minimum_age=18, maximum_age=90)
        keyword = self.rng.choice(["DOB: ", "Date of birth: ", "born on ", "birthday ", "D.O.B. ", "Birthdate: "])
        style = self.rng.randrange(5)
        if style == 0:
            text = date.strftime("%m/%d/%Y")
        elif style == 1:
            text = date.isoformat()
        elif style == 2:
            text = date.strftime("%d.%m.%Y")
        elif style == 3:
            text = date.strftime("%B %-d, %Y")
        else:
            text = date.strftime("%-d %b %Y")
        return keyword, text

    def address(self) -> str:
        return str(self.en.street_address())

    # --- texts ----------------------------------------------------------------------

    def filler(self) -> str:
        return str(self.en.sentence(nb_words=self.rng.randrange(5, 14)))

    def plain(self) -> Builder:
        b = Builder()
        b.add(self.filler() + " ")
        for index in range(self.rng.choice([1, 1, 2, 2, 3])):
            self._entity(b)
            b.add(self.rng.choice([". ", "; ", ", and ", ". Thanks. ", "\n"]) if index < 2 else ". ")
        b.add(self.filler())
        return b

    def _entity(self, b: Builder) -> None:
        kind = self.rng.choices(["EMAIL", "PHONE", "CARD", "SSN", "IBAN", "IP", "SECRET", "DOB", "ADDRESS"],
                                weights=[16, 18, 12, 10, 10, 12, 10, 6, 6])[0]
        name = self.en.name()
        if kind == "EMAIL":
            b.add(self.rng.choice([f"Contact {name} at ", "Email: ", "Send it to ", f"{name} <", "Reply to "]))
            b.add(self.email(), "EMAIL")
        elif kind == "PHONE":
            b.add(self.rng.choice(["Call ", "Phone: ", f"Reach {name} on ", "Tel. ", f"{name}, ", "mobile "]))
            b.add(self.phone(), "PHONE")
        elif kind == "CARD":
            b.add(self.rng.choice(["Card number ", "Paid with ", "CC: ", "card ", "Visa "]))
            b.add(self.card(), "CARD")
        elif kind == "SSN":
            value, bare = self.ssn()
            b.add("SSN " if bare else self.rng.choice(["SSN: ", "social security number ", f"{name}'s SSN is ", "ID "]))
            b.add(value, "SSN")
        elif kind == "IBAN":
            b.add(self.rng.choice(["IBAN ", "Transfer to ", "account: ", "Bankverbindung: "]))
            b.add(self.iban(), "IBAN")
        elif kind == "IP":
            b.add(self.rng.choice(["Login from ", "client ip ", "server at ", "blocked address "]))
            b.add(self.ip(), "IP")
        elif kind == "SECRET":
            prefix, value = self.secret()
            b.add(prefix)
            b.add(value, "SECRET")
        elif kind == "DOB":
            keyword, value = self.dob()
            b.add(f"{name}, " + keyword)
            b.add(value, "DOB")
        else:
            b.add(self.rng.choice(["Ship to ", "Lives at ", "Address: ", "Office: "]))
            b.add(self.address(), "ADDRESS")

    def negative(self) -> Builder:
        r = self.rng
        b = Builder()
        b.add(self.filler() + " ")
        makers: list[Callable[[], str]] = [
            self._bad_card, self._bad_iban, self._bad_ssn, self._version, self._plain_date,
            lambda: str(self.en.uuid4()), lambda: self.en.sha1(), lambda: f"ISBN {self.en.isbn13()}",
            lambda: f"order #{r.randrange(10**7, 10**8)}", lambda: f"at {r.randrange(24):02d}:{r.randrange(60):02d}:00",
            lambda: f"${r.randrange(1000, 99999):,}.{r.randrange(100):02d}", lambda: f"ZIP {self.en.postcode()}",
            lambda: "sk-learn-compatible-estimators", lambda: f"build {r.randrange(1000, 9999)}-{r.randrange(10, 99)}",
            lambda: f"{r.randrange(1, 400)} pages, {r.randrange(1, 30)} chapters",
        ]
        for _ in range(r.choice([1, 2, 3])):
            b.add(r.choice(makers)() + r.choice([". ", "; ", " and "]))
        b.add(self.filler())
        return b

    def adjacent(self) -> Builder:
        r = self.rng
        b = Builder()
        b.add(r.choice(["Call ", "Paid with ", "ids: ", "ref ", "Details: ", ""]))
        for index in range(r.choice([2, 2, 2, 3])):
            if index:
                b.add(r.choice([" ", "  ", ", ", "/", " / ", " - ", "; ", "\n", " and ", " | "]))
            kind = r.choice(["CARD", "PHONE", "SSN", "IBAN"])
            if kind == "CARD":
                b.add(self.card(), "CARD")
            elif kind == "PHONE":
                b.add(self.phone(), "PHONE")
            elif kind == "SSN":
                value, bare = self.ssn()
                if bare:  # nine bare digits are an SSN only after "SSN": not what this variant tests
                    value = f"{value[:3]}-{value[3:5]}-{value[5:]}"
                b.add(value.replace(" ", "-"), "SSN")
            else:
                b.add(self.iban(), "IBAN")
        b.add(r.choice([" now.", ".", "", " thanks."]))
        return b

    def _bad_card(self) -> str:
        number = self.en.credit_card_number()
        last = str((int(number[-1]) + self.rng.randrange(1, 10)) % 10)
        number = number[:-1] + last  # one changed digit always breaks Luhn
        return "card " + " ".join(number[i:i + 4] for i in range(0, len(number), 4))

    def _bad_iban(self) -> str:
        value = str(self.fakers[self.rng.choice(IBAN_LOCALES)].iban())
        check = (int(value[2:4]) + self.rng.randrange(1, 96)) % 97
        value = value[:2] + f"{check:02d}" + value[4:]
        if value[2:4] in ("00", "01"):
            value = value[:2] + "50" + value[4:]
        return "IBAN " + value

    def _bad_ssn(self) -> str:
        area = self.rng.choice(["000", "666", f"9{self.rng.randrange(10)}{self.rng.randrange(10)}"])
        return f"ref {area}-{self.rng.randrange(1, 99):02d}-{self.rng.randrange(1, 9999):04d}"

    def _version(self) -> str:
        r = self.rng
        return r.choice([
            f"v{r.randrange(10)}.{r.randrange(20)}.{r.randrange(50)}.{r.randrange(100)}",
            f"{r.randrange(10)}.{r.randrange(20)}.{r.randrange(50)}.{r.randrange(9)}.{r.randrange(9)}",
            f"Python 3.{r.randrange(8, 14)}.{r.randrange(12)}",
            f"release {r.randrange(300, 999)}.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(256)}",
        ])

    def _date_of_birth(self, minimum_age: int, maximum_age: int) -> date:
        """Faker's ``date_of_birth`` (the same draws) with ``REFERENCE_DATE`` for today."""
        start = change_year(REFERENCE_DATE, -(maximum_age + 1))
        end = change_year(REFERENCE_DATE, -minimum_age)
        born = self.en.date_time_ad(start_datetime=start, end_datetime=end).date()
        return born if born != start else born + timedelta(days=1)

    def _plain_date(self) -> str:
        # Faker's ``date_this_decade()`` (the same draw) with ``REFERENCE_DATE`` for today.
        decade = date(REFERENCE_DATE.year - REFERENCE_DATE.year % 10, 1, 1)
        return f"Meeting on {self.en.date_between_dates(decade, REFERENCE_DATE).isoformat()}"

    def evasion(self) -> Builder:
        b = Builder()
        b.add(self.filler() + " ")
        trick = self.rng.randrange(6)
        if trick == 0:
            value = self.en.email()
            cut = self.rng.randrange(1, len(value) - 1)
            b.add("Email: ")
            b.add(value[:cut] + self.rng.choice(["\u200b", "\u200d", "\u00ad", "\u2060"]) + value[cut:], "EMAIL")
        elif trick == 1:
            value, _ = self.ssn()
            b.add("SSN: ")
            b.add(value.translate(str.maketrans("0123456789", "０１２３４５６７８９")), "SSN")
        elif trick == 2:
            value = self.en.email()
            b.add("mail ")
            b.add(value.replace("o", "\u043e", 1).replace("a", "\u0430", 1), "EMAIL")
        elif trick == 3:
            user, domain = self.en.email().split("@")
            b.add("Email: ")
            b.add(user + self.rng.choice(["%40", "&#64;", " [at] "]) + domain, "EMAIL")
        elif trick == 4:
            value = self.card().replace(" ", "").replace("-", "").replace(".", "")
            b.add("card ")
            b.add(value.translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")), "CARD")
        else:
            value = self.en.ipv4_public()
            b.add("ip ")
            b.add(value.replace(".", "\u200b.", 1), "IP")
        b.add(". " + self.filler())
        return b


def generate(n: int, seed: int, adjacent: int = 0) -> list[dict[str, object]]:
    gen = Generator(seed)
    rows: list[dict[str, object]] = []
    for index in range(n):
        roll = gen.rng.random()
        variant = "plain" if roll < 0.75 else "negative" if roll < 0.93 else "evasion"
        builder = {"plain": gen.plain, "negative": gen.negative, "evasion": gen.evasion}[variant]()
        rows.append({"id": index, "variant": variant, "text": builder.text(), "entities": builder.spans})
    neighbours = Generator(seed + 1)
    for index in range(n, n + adjacent):
        builder = neighbours.adjacent()
        rows.append({"id": index, "variant": "adjacent", "text": builder.text(), "entities": builder.spans})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2400)
    parser.add_argument("--adjacent", type=int, default=ADJACENT)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    rows = generate(args.n, args.seed, args.adjacent)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for row in rows:
        for entity in row["entities"]:  # type: ignore[attr-defined]
            counts[entity["type"]] = counts.get(entity["type"], 0) + 1
    print(f"wrote {len(rows)} texts, {args.out.stat().st_size} bytes to {args.out}; entities: {counts}")


if __name__ == "__main__":
    main()
