"""The shortcuts of the PII hot path answer exactly what the slow forms they replace do.

Each shortcut (issue 5, speed) is pinned against its reference on seeded inputs: the
IBAN checksum without ``str.translate``, IPv6 parsing in C instead of ``ipaddress``, the
per-shape answer of the phone pre-test, and the engine's "no search after the last
digit" (or the last required literal) for the rules that declare every match holds one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import random
import string
from pathlib import Path

import pytest

from bench.pii_pathological import PATHOLOGICAL
from privacy.pii import PiiEngine, recognizers
from privacy.pii.recognizers import RULES, iban_valid
from privacy.pii.regex import Pattern
from tests.support.pii_texts import dense_texts, iban

CORPUS = Path(__file__).resolve().parents[2] / "bench" / "data" / "pii_corpus.jsonl"


def _iban_reference(compact: bytes) -> bool:
    if not compact.isalnum() or not compact.isascii():
        return False
    rearranged = (compact[4:] + compact[:4]).decode()
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def test_iban_checksum_matches_the_iso_7064_definition() -> None:
    rng = random.Random(5)
    seen = {True: 0, False: 0}
    for _ in range(5000):
        value = iban(rng).replace(" ", "").encode()
        roll = rng.random()
        if roll < 0.2:
            value = value[:2].lower() + value[2:]  # letters of either case
        elif roll < 0.4:
            spot = rng.randrange(4, len(value))
            value = value[:spot] + rng.choice(string.ascii_letters).encode() + value[spot + 1:]  # letters in the BBAN
        elif roll < 0.5:
            value = value[:2] + b"X" + value[3:]  # a letter among the check digits
        seen[iban_valid(value)] += 1
        assert iban_valid(value) == _iban_reference(value), value
    assert seen[True] > 1000 and seen[False] > 1000


def _ipaddress_verdict(address: str) -> bool | None:
    try:
        return int(ipaddress.IPv6Address(address)) != 0
    except ValueError:
        return None


def test_ipv6_check_accepts_what_ipaddress_accepts() -> None:
    rng = random.Random(11)
    parts = ("", "0", "1", "fe80", "ffff", "db8", "2001", "00000", "12345", "0db8", "FFFF", "a", "1.2.3.4",
             "01.2.3.4", "256.1.1.1", "1.2.3", "192.0.2.128")
    accepted = 0
    for _ in range(20000):
        address = ":".join(rng.choice(parts) for _ in range(rng.randint(1, 9)))
        address = rng.choice(("", "::")) + address + rng.choice(("", "::", ""))
        data = f"at {address} now".encode()
        span = recognizers._check_ipv6(data, 3, 3 + len(address))
        reference = _ipaddress_verdict(address)
        if address.endswith(":") and not address.endswith("::"):
            continue  # the check trims a trailing colon first: another address
        if not any(c in string.digits for c in address) and address.count(":") < 7:
            reference = None  # "dead::beef": a word, whatever the parser says
        assert (span is not None) == bool(reference), address
        accepted += span is not None
    assert accepted > 1000


def test_phone_pre_test_per_shape_matches_the_direct_answer() -> None:
    engine = PiiEngine(["PHONE"])
    pattern = Pattern(next(rule.source for rule in RULES if rule.name == "phone"))
    checked = 0
    for text in dense_texts(9, 400):
        data = text.encode()
        position = 0
        while (found := pattern.search(data, position)) is not None:
            start, end = found.group(1)
            chunk = data[start:end]
            assert recognizers._maybe_strong(chunk) == recognizers._strong_shape(chunk), chunk
            checked += 1
            position = max(end, found.start + 1)
    assert checked > 1000
    assert engine.scan("call 415 555 0132")  # the cache answers a shape it has seen the same way


@pytest.mark.parametrize("rule", [rule for rule in RULES if rule.needs_digit], ids=lambda rule: rule.name)
def test_rules_that_need_a_digit_never_match_without_one(rule: recognizers.Rule) -> None:
    """Evidence for ``needs_digit`` (the proof is each pattern's mandatory ``[0-9]``): the
    committed corpus and number-dense texts with every digit taken out have no match."""
    with CORPUS.open(encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    texts += dense_texts(4, 500) + ["+ ( ) - . / x ext # Main St Ave IBAN DE GB :: 0x ff"]
    pattern = Pattern(rule.source)
    table = str.maketrans("", "", string.digits)
    assert all(pattern.search(text.translate(table).encode()) is None for text in texts)
    assert any(pattern.search(text.encode()) is not None for text in texts)


@pytest.mark.parametrize("rule", [rule for rule in RULES if rule.opens_with is not None], ids=lambda rule: rule.name)
def test_after_entity_rules_open_only_with_their_declared_bytes(rule: recognizers.Rule) -> None:
    """Evidence for ``opens_with`` (the proof is the pattern's first byte after its glue):
    after "-" or ".", every byte outside the declared ones refuses the phone that follows,
    and each declared byte opens a candidate that the anchored pattern finds."""
    assert rule.opens_with is not None
    pattern = Pattern(rule.source)
    tails = (b"415-555-0132 ", b"4155550132 ", b" 415 555 0132 ", b"0 20 7946 0958 ", b"(415) 555-0132 ")
    for glue in (b"-", b"."):
        for byte in range(256):
            if byte in rule.opens_with:
                continue
            for tail in tails:
                data = b"ab" + glue + bytes([byte]) + tail
                assert pattern.spans_at(data, 2, len(data))[0][0] < 0, data
        for opener, tail in ((b"+", b"44 20 7946 0958 "), (b"(", b"415) 555-0132 "), (b"0", b"20 7946 0958 "),
                             *((str(d).encode(), b"15-555-0132 ") for d in range(1, 10))):
            data = b"ab" + glue + opener + tail
            assert pattern.spans_at(data, 2, len(data))[0][0] == 2, data


def _literal_samples() -> list[str]:
    """A match of every prefixed key, PEM, IPv6 and glued IPv4 form, alone and in prose."""
    body = "Ab3" * 120
    keys = ["AKIA" + "A" * 16, "ghp_" + body[:40], "github_pat_" + body[:30], "glpat-" + body[:24],
            "xoxb-" + body[:20], "https://hooks.slack.com/services/" + body[:30], "sk_live_" + body[:20],
            "rk_test_" + body[:20], "whsec_" + body[:30], "sk-" + body[:30], "sk-proj-" + body[:30],
            "AIza" + body[:35], "hf_" + body[:34], "npm_" + body[:36], "pypi-AgEIcHlwaS5vcmc" + body[:60],
            "SG." + body[:22] + "." + body[:43], "SK" + "0a" * 16, "eyJhbGciOi.eyJzdWIi." + body[:20],
            "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----", "-----BEGIN PRIVATE KEY-----abc",
            "fe80::1%eth0", "2001:db8::8a2e:370:7334", "::ffff:192.0.2.128", "1:2:3:4:5:6:7:8", "a:b:c",
            "1.2.3.4", "10.0.0.1_10.0.0.2", "1.2.3.4_5.6.7.8", "10.1.2.3.10.1.2.4", "1.2.3.4.5.6.7.8",
            "ssn 078-05-1120_219-09-9999", "078-05-1120.219-09-9999"]
    return [f"{prefix}{key}{suffix}" for key in keys for prefix, suffix in (("key ", " ok"), ("", ""), ("(", ")."))]


@pytest.mark.parametrize("rule", [rule for rule in RULES if rule.required], ids=lambda rule: rule.name)
def test_every_match_holds_one_of_the_rules_required_literals(rule: recognizers.Rule) -> None:
    """Evidence for ``required`` (the proof is each alternative of the pattern, written next
    to the literals): every match found in the committed corpus, number-dense texts, the
    pathological inputs and samples of each key holds one of the literals, enough times, in
    the rule's view. The engine then never searches past the last one (it could only fail)."""
    with CORPUS.open(encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    texts += dense_texts(6, 500) + _literal_samples()
    texts += [make(4096) for _, make in PATHOLOGICAL]
    pattern = Pattern(rule.source)
    matches = 0
    for text in texts:
        data = text.encode()
        view = data if rule.view is None else data.translate(rule.view)
        position = 0
        while (found := pattern.search(data, position)) is not None:
            held = view[found.start:found.end]
            assert any(held.count(literal) >= rule.required_times for literal in rule.required), (rule.name, held)
            matches += 1
            position = found.start + 1
    assert matches > 0


def test_the_engine_searches_no_rule_past_its_last_required_literal() -> None:
    """The bound is where the engine stops: the same detections as with no literal declared,
    on texts where the last literal comes early and candidates follow it."""
    engine = PiiEngine()
    plain = PiiEngine()
    plain._rules = tuple(dataclasses.replace(rule, required=()) for rule in plain._rules)
    texts = ["ip 10.0.0.1 then 1-2-3 4.5 and 10.0.0 then 99", "IBAN DE89370400440532013000 then ab1 x12",
             "sk-abc123def456ghi789jkl then sk-short and sk", "ssn 078-05-1120 then 12 34 567 and 0000",
             "fe80::1 then a:b and : only"] + dense_texts(8, 300)
    for text in texts:
        assert engine.scan(text) == plain.scan(text), text
