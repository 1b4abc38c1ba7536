"""Every entity type, valid and invalid forms: what is masked and what is left alone."""

from __future__ import annotations

import pytest

from privacy.pii import PiiEngine
from privacy.pii.recognizers import card_number_ok, date_valid, iban_valid, luhn_valid, phone_valid, ssn_valid

ENGINE = PiiEngine()


def found(text: str) -> list[tuple[str, str]]:
    return [(d.entity, text[d.start:d.end]) for d in ENGINE.scan(text)]


POSITIVE = [
    # --- EMAIL
    ("mail john.doe@example.com now", "EMAIL", "john.doe@example.com"),  # plain
    ("to john.doe+news@example.co.uk.", "EMAIL", "john.doe+news@example.co.uk"),  # plus-addressing, ccTLD
    ("write jürgen@müller.de", "EMAIL", "jürgen@müller.de"),  # IDN local part and domain
    ("or 用户@例子.广告", "EMAIL", "用户@例子.广告"),  # CJK IDN
    ("or почта@пример.рф", "EMAIL", "почта@пример.рф"),  # Cyrillic IDN
    ("punycode a@xn--mller-kva.de", "EMAIL", "a@xn--mller-kva.de"),  # A-label domain
    ("a@b.xn--p1ai works", "EMAIL", "a@b.xn--p1ai"),  # A-label TLD
    ("q=john.doe%40example.com", "EMAIL", "john.doe%40example.com"),  # percent-encoded @ (PII-03)
    ("john.doe&#64;example.com", "EMAIL", "john.doe&#64;example.com"),  # HTML entity @ (PII-03)
    ("john.doe [at] example [dot] com", "EMAIL", "john.doe [at] example [dot] com"),  # documented [at] policy
    ("<JOHN.DOE@EXAMPLE.COM>", "EMAIL", "JOHN.DOE@EXAMPLE.COM"),  # upper case
    # --- PHONE
    ("call 415-555-0132 today", "PHONE", "415-555-0132"),  # NANP dashed
    ("(415) 555-0132", "PHONE", "(415) 555-0132"),  # NANP parenthesised
    ("+1 415 555 0132", "PHONE", "+1 415 555 0132"),  # NANP international
    ("+14155550132", "PHONE", "+14155550132"),  # E.164
    ("+44 20 7946 0958", "PHONE", "+44 20 7946 0958"),  # UK international
    ("0044 20 7946 0958", "PHONE", "0044 20 7946 0958"),  # 00 international prefix
    ("+33 1 23 45 67 89", "PHONE", "+33 1 23 45 67 89"),  # France
    ("+49 30 1234567", "PHONE", "+49 30 1234567"),  # Germany
    ("+91 98765 43210", "PHONE", "+91 98765 43210"),  # India
    ("+81 3-1234-5678", "PHONE", "+81 3-1234-5678"),  # Japan
    ("+55 11 91234-5678", "PHONE", "+55 11 91234-5678"),  # Brazil
    ("020 7946 0958", "PHONE", "020 7946 0958"),  # UK national, trunk 0
    ("01 23 45 67 89", "PHONE", "01 23 45 67 89"),  # French national
    ("415.555.0132 x123", "PHONE", "415.555.0132 x123"),  # dotted with extension
    ("tel: 4155550132", "PHONE", "4155550132"),  # bare digits near a keyword
    ("Call 415-555-0132 24 hours a day", "PHONE", "415-555-0132"),  # trailing number not taken
    # --- CARD
    ("card 4111 1111 1111 1111", "CARD", "4111 1111 1111 1111"),  # Visa, spaces
    ("4111-1111-1111-1111", "CARD", "4111-1111-1111-1111"),  # dashes
    ("4111.1111.1111.1111", "CARD", "4111.1111.1111.1111"),  # dots
    ("4111 - 1111 - 1111 - 1111", "CARD", "4111 - 1111 - 1111 - 1111"),  # spaced dashes
    ("4111111111111111", "CARD", "4111111111111111"),  # contiguous
    ("amex 3782 822463 10005", "CARD", "3782 822463 10005"),  # Amex 4-6-5
    ("5555555555554444.", "CARD", "5555555555554444"),  # Mastercard
    ("4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1", "CARD", "4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1"),  # one digit per group
    ("41 11 11 11 11 11 11 11", "CARD", "41 11 11 11 11 11 11 11"),  # pairs
    ("Maestro card 5020 2511 7164", "CARD", "5020 2511 7164"),  # 12 digits, with a card keyword
    # --- SSN
    ("SSN 078-05-1120", "SSN", "078-05-1120"),  # catalogue canary
    ("ssn: 078 05 1120", "SSN", "078 05 1120"),  # spaces
    ("id 123-45-6789 ok", "SSN", "123-45-6789"),  # no keyword needed when dashed
    ("social security number 078051120", "SSN", "078051120"),  # bare, with keyword
    # --- IBAN
    ("IBAN DE89 3704 0044 0532 0130 00", "IBAN", "DE89 3704 0044 0532 0130 00"),  # spaced
    ("DE89370400440532013000", "IBAN", "DE89370400440532013000"),  # compact
    ("GB82 WEST 1234 5698 7654 32", "IBAN", "GB82 WEST 1234 5698 7654 32"),  # letters in BBAN
    ("fr14 2004 1010 0505 0001 3m02 606", "IBAN", "fr14 2004 1010 0505 0001 3m02 606"),  # lower case
    # --- IP
    ("from 192.168.1.20.", "IP", "192.168.1.20"),  # IPv4 at sentence end
    ("host 8.8.8.8:53", "IP", "8.8.8.8"),  # with port
    ("net 10.0.0.0/8", "IP", "10.0.0.0"),  # CIDR
    ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "IP", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),  # IPv6 full
    ("v6 2001:db8::1 up", "IP", "2001:db8::1"),  # compressed
    ("lo ::1", "IP", "::1"),  # loopback
    ("link fe80::1%eth0", "IP", "fe80::1%eth0"),  # zone id
    ("mapped ::ffff:192.0.2.128", "IP", "::ffff:192.0.2.128"),  # IPv4-mapped
    ("[2001:db8::1]:443", "IP", "2001:db8::1"),  # bracketed with port
    # --- SECRET
    ("aws AKIAIOSFODNN7EXAMPLE", "SECRET", "AKIAIOSFODNN7EXAMPLE"),  # AWS access key id
    ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "SECRET", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),  # GitHub
    ("xoxb-123456789012-abcdefghijkl", "SECRET", "xoxb-123456789012-abcdefghijkl"),  # Slack bot
    ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "SECRET", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),  # Stripe
    ("sk-proj-abc123DEF456ghi789JKL012", "SECRET", "sk-proj-abc123DEF456ghi789JKL012"),  # OpenAI project key
    ("sk-Ab3dEf6hIj9kLm2nOp5qRs8tUv", "SECRET", "sk-Ab3dEf6hIj9kLm2nOp5qRs8tUv"),  # OpenAI legacy key
    ("AIzaSyA-1234567890abcdefghijklmnopqrstu", "SECRET", "AIzaSyA-1234567890abcdefghijklmnopqrstu"),  # Google
    ("-----BEGIN PRIVATE KEY-----\nMIIEvQ==\n-----END PRIVATE KEY-----",
     "SECRET", "-----BEGIN PRIVATE KEY-----\nMIIEvQ==\n-----END PRIVATE KEY-----"),  # PKCS#8 PEM
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA", "SECRET",
     "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA"),  # truncated PEM: masked to the end of the body
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl", "SECRET",
     "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"),  # JWT
    ("password=hunter22x", "SECRET", "hunter22x"),  # assignment: the value only
    ('"api_key": "abcd1234efgh"', "SECRET", "abcd1234efgh"),  # JSON style
    ("Authorization: Bearer abcdefghijklmnop1234", "SECRET", "abcdefghijklmnop1234"),  # bearer header
    # --- DOB
    ("DOB: 03/14/1985", "DOB", "03/14/1985"),  # US numeric
    ("date of birth 1985-03-14", "DOB", "1985-03-14"),  # ISO
    ("born on March 5, 1985", "DOB", "March 5, 1985"),  # month name
    ("Geburtsdatum: 14.03.1985", "DOB", "14.03.1985"),  # German
    ("14 Mar 1985 is my birthday", "DOB", "14 Mar 1985"),  # keyword after
    # --- ADDRESS
    ("ship to 123 Main Street Apt. 4, Springfield", "ADDRESS", "123 Main Street Apt. 4"),  # street + unit
    ("at 4500 N Lake Shore Dr", "ADDRESS", "4500 N Lake Shore Dr"),  # directional, abbreviation
]


@pytest.mark.parametrize(("text", "entity", "value"), POSITIVE)
def test_entity_is_found(text: str, entity: str, value: str) -> None:
    assert (entity, value) in found(text)


NEGATIVE = [
    "card 4111 1111 1111 1112",  # Luhn failure
    "4111111111111112",  # Luhn failure, contiguous
    "order 1234 5678 9012 3456",  # Luhn failure in card layout
    "7111 1111 1111 1114",  # Luhn-valid but no payment-card issuer prefix, no keyword
    "IBAN DE88 3704 0044 0532 0130 00",  # IBAN checksum failure
    "XX89 3704 0044 0532 0130 00",  # unknown country
    "666-12-3456",  # SSN area 666
    "000-12-3456",  # SSN area 000
    "900-12-3456",  # SSN area 9xx (ITIN)
    "123-00-4567",  # SSN group 00
    "123-45-0000",  # SSN serial 0000
    "078051120",  # nine bare digits without keyword
    "v1.2.3.4",  # version string shaped like an IP
    "1.2.3.4.5",  # five components
    "release 300.1.2.3",  # octet over 255
    "01.02.03.04",  # leading zeros
    "Python 3.11.7",  # version
    "at 12:30:45",  # time, not IPv6
    "std::vector and dead::beef",  # C++ scope, hex words
    "MAC 00:1a:2b:3c:4d:5e",  # six groups: not IPv6
    "Meeting on 2024-03-14",  # a date without a birth keyword
    "DOB: 02/30/1985",  # no such date
    "sk-learn-compatible-estimators",  # prose after sk-
    "ISBN 978-3-16-148410-0",  # ISBN
    "pages 12 - 20, 30 - 40",  # number ranges
    "price $1,234.56",  # money
    "uuid 123e4567-e89b-12d3-a456-426614174000",  # UUID
    "sha1 d6f5db359ca3143bb5fefd9c6629c939264426f4",  # hex digest
    "john at example dot com",  # bare words: documented as not masked
    "[EMAIL] [PHONE] [CARD:abcdefghijklmnop]",  # our own tags
]


@pytest.mark.parametrize("text", NEGATIVE)
def test_non_entity_is_left_alone(text: str) -> None:
    assert found(text) == []


@pytest.mark.parametrize(("digits", "ok"), [
    (b"4111111111111111", True),  # textbook Visa test number
    (b"4111111111111112", False),  # last digit off
    (b"79927398713", True),  # Luhn's own example
])
def test_luhn(digits: bytes, ok: bool) -> None:
    assert luhn_valid(digits) is ok


def test_helpers_agree_with_the_standards() -> None:
    assert iban_valid(b"GB82WEST12345698765432")  # ISO 13616 example
    assert not iban_valid(b"GB82WEST12345698765433")  # one digit changed
    assert ssn_valid(b"078051120")
    assert not ssn_valid(b"666051120")
    assert card_number_ok(b"5020251171640", keyword=False) is False  # 13 digits, Luhn off
    assert date_valid(b"February 29, 2000")
    assert not date_valid(b"February 30, 2000")
    assert phone_valid(b"+44 20 7946 0958")
    assert not phone_valid(b"+999 1234 5678")  # no such country code


def test_overlapping_detections_are_merged_under_the_stronger_type() -> None:
    # The IBAN's digits contain a Luhn-valid 16-digit run: one IBAN, not a card inside it.
    text = "FR21 7667 3202 2741 7150 7081 358"
    assert [entity for entity, _ in found(text)] == ["IBAN"]
