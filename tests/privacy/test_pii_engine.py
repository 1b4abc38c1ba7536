"""The engine as a whole: split entities, linear time, redaction for logs, no values kept."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from privacy.pii import PiiEngine, Replace
from privacy.pii import redact as redact_module
from privacy.pii.redact import REDACTION_FAILED, redact_text, redact_value

ENGINE = PiiEngine()
TAGS = {entity: Replace() for entity in ENGINE.entities}


class TestSplitAcrossElements:
    @pytest.mark.parametrize(("elements", "entity"), [
        (["reach me at john.doe@exa", "mple.com please"], "EMAIL"),  # joined with ""
        (["john.doe@example", ".com"], "EMAIL"),  # split at the dot
        (["card 4111 1111", "1111 1111"], "CARD"),  # joined with " "
        (["SSN 078-05-", "1120"], "SSN"),  # joined with ""
        (list("078-05-1120"), "SSN"),  # one character per element
        (["-----BEGIN PRIVATE KEY-----", "MIIEvQIBADANBg", "-----END PRIVATE KEY-----"], "SECRET"),  # multi-line
        (["DOB:", "03/14/1985"], "DOB"),  # keyword in another element
    ])
    def test_joined_only_entity_masked_in_every_element(self, elements: list[str], entity: str) -> None:
        masked, counts = ENGINE.mask_many(elements, TAGS)
        assert counts == {entity: 1}
        joined = "".join(masked)
        assert f"[{entity}]" in joined
        for digits_or_at in ("@", "1120", "4111", "MIIE", "1985"):
            assert digits_or_at not in joined

    def test_whole_entities_stay_per_element(self) -> None:
        masked, counts = ENGINE.mask_many(["a john@example.com", "b 415-555-0132", "nothing here"], TAGS)
        assert masked == ["a [EMAIL]", "b [PHONE]", "nothing here"]
        assert counts == {"EMAIL": 1, "PHONE": 1}

    def test_no_joins_means_per_element_only(self) -> None:
        masked, counts = ENGINE.mask_many(["john.doe@exa", "mple.com"], TAGS, joins=())
        assert counts == {} and masked == ["john.doe@exa", "mple.com"]


# Pathological inputs, one per pattern family (nested-quantifier bait for a backtracking
# engine): the cost must grow linearly with the input.
PATHOLOGICAL: list[tuple[str, Callable[[int], str]]] = [
    ("a then @", lambda n: "a" * n + "@"),  # e-mail local part, no domain (PII-08)
    ("dash ones", lambda n: ("1-" * n)[:n]),  # phone/SSN/card separators (PII-08)
    ("digit pairs", lambda n: ("12-" * n)[:n]),  # phone groups
    ("space digits", lambda n: ("1 " * n)[:n]),  # spread card
    ("card groups", lambda n: ("4111 " * n)[:n]),  # card windows
    ("dotted", lambda n: ("1.1.1.1." * n)[:n]),  # IPv4
    ("colons", lambda n: ("1:" * n)[:n]),  # IPv6
    ("at dot", lambda n: ("a@a." * n)[:n]),  # e-mail domains
    ("obfuscated at", lambda n: ("a [at] b [dot] " * n)[:n]),  # e-mail [at] forms
    ("iban", lambda n: ("DE89 " * n)[:n]),  # IBAN groups
    ("dates", lambda n: ("DOB 1/1/1990 " * n)[:n]),  # dense DOBs
    ("pem", lambda n: ("-----BEGIN PRIVATE KEY-----" * n)[:n]),  # PEM without END
    ("jwt", lambda n: ("eyJ." * n)[:n]),  # JWT prefix
    ("assign", lambda n: ("password=" * n)[:n]),  # assignment keyword
    ("street", lambda n: ("1 Main Main Main " * n)[:n]),  # address words
    ("zero width", lambda n: ("j\u200b" * n)[:n]),  # normalization deletions
    ("rlo", lambda n: ("\u202e1" * n)[:n]),  # override runs
    ("fullwidth", lambda n: "\uff11" * n),  # normalization folds
]


def _cpu(text: str) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        ENGINE.mask(text, TAGS)
        best = min(best, time.process_time() - start)
    return best


@pytest.mark.parametrize(("name", "make"), PATHOLOGICAL, ids=[p[0] for p in PATHOLOGICAL])
def test_linear_time(name: str, make: Callable[[int], str]) -> None:
    small, large = _cpu(make(10_000)), _cpu(make(100_000))
    # 10x the input costs about 10x; a quadratic pattern would cost ~100x. The floor keeps
    # timer resolution from deciding when both are tiny.
    assert large <= max(25 * small, 0.02), f"{name}: 10 KB {small * 1e3:.2f} ms, 100 KB {large * 1e3:.2f} ms"


def test_a_64k_element_stays_within_budget() -> None:
    """Catalogue PII-08: at most 50 ms per 64 KiB element (generous factor for CI noise)."""
    worst = max(_cpu(make(65_536)) for _, make in PATHOLOGICAL)
    assert worst < 0.25


class TestRedact:
    def test_log_line(self) -> None:
        line = "bad datatype in {'data': ['john.doe@example.com 078-05-1120 4111111111111111']}"
        assert redact_text(line) == "bad datatype in {'data': ['[EMAIL] [SSN] [CARD]']}"

    def test_short_and_clean_pass_through(self) -> None:
        assert redact_text("ok") == "ok"
        assert redact_text("request rejected by input policy") == "request rejected by input policy"

    def test_fails_closed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def broken() -> PiiEngine:
            raise RuntimeError("boom")

        monkeypatch.setattr(redact_module, "_engine", broken)
        assert redact_text("john.doe@example.com") == REDACTION_FAILED

    def test_nested_values(self) -> None:
        event = {"msg": "from 10.1.2.3", "n": 3, "items": ["a@b.co", ("x", b"078-05-1120")]}
        assert redact_value(event) == {"msg": "from [IP]", "n": 3, "items": ["[EMAIL]", ("x", "[SSN]")]}


def test_detections_hold_no_values() -> None:
    detection = ENGINE.scan("john.doe@example.com")[0]
    assert "john" not in repr(detection)
    assert set(detection.__slots__) == {"entity", "start", "end"}


def test_unknown_entity_refused() -> None:
    with pytest.raises(ValueError, match="unknown PII entity"):
        PiiEngine({"EMAIL", "PASSPORT"})
