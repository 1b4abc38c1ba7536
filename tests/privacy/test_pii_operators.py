"""Every operator, keyed pseudonyms and reversible tokens."""

from __future__ import annotations

import pytest

from privacy.pii import AesGcmTokenizer, HmacPseudonym, Mask, PiiEngine, Redact, Replace
from privacy.pii.operators import Operator

ENGINE = PiiEngine()
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
TEXT = "Contact john.doe@example.com, 415-555-0132, SSN 078-05-1120, card 4111 1111 1111 1111"


def mask_all(operator: Operator, text: str = TEXT) -> str:
    return ENGINE.mask(text, dict.fromkeys(ENGINE.entities, operator))[0]


@pytest.mark.parametrize(("operator", "expected"), [
    # redact removes the value (Presidio's redact)
    (Redact(), "Contact , , SSN , card "),
    # replace writes the type tag
    (Replace(), "Contact [EMAIL], [PHONE], SSN [SSN], card [CARD]"),
    # replace with a custom tag
    (Replace("<PII>"), "Contact <PII>, <PII>, SSN <PII>, card <PII>"),
    # mask keeps separators and the last 4 letters/digits (never more than half)
    (Mask(), "Contact ****.***@******e.com, ***-***-0132, SSN ***-**-1120, card **** **** **** 1111"),
    # mask keeping nothing
    (Mask(keep_last=0, char="#"), "Contact ####.###@#######.###, ###-###-####, SSN ###-##-####, card "
                                  "#### #### #### ####"),
])
def test_operator_output(operator: Operator, expected: str) -> None:
    assert mask_all(operator) == expected


def test_mask_never_reveals_more_than_half() -> None:
    assert Mask(keep_last=8).apply("IP", "10.0.0.1") == "**.*.0.1"


def test_mask_of_a_piece_reveals_nothing() -> None:
    assert Mask().apply("CARD", "4111 1111", partial=True) == "**** ****"


def test_mask_works_on_the_folded_value() -> None:
    # Zero-width and fullwidth characters do not survive into the masked text.
    assert Mask().apply("SSN", "\uff10\u200b78-05-1120") == "***-**-1120"


@pytest.mark.parametrize("bad", [{"keep_last": 9}, {"keep_last": -1}, {"char": "ab"}, {"char": "x"}])
def test_mask_parameters_are_checked(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="mask needs"):
        Mask(**bad)  # type: ignore[arg-type]


class TestHmacPseudonym:
    def test_same_value_same_pseudonym_across_formats(self) -> None:
        """Linkable: one person's card written two ways gets one pseudonym."""
        op = HmacPseudonym(KEY_A)
        assert op.apply("CARD", "4111 1111 1111 1111") == op.apply("CARD", "4111-1111-1111-1111")
        assert op.apply("EMAIL", "John.Doe@Example.com") == op.apply("EMAIL", "john.doe [at] example [dot] com")

    def test_depends_on_key_and_type(self) -> None:
        a, b = HmacPseudonym(KEY_A), HmacPseudonym(KEY_B)
        assert a.apply("SSN", "078-05-1120") != b.apply("SSN", "078-05-1120")
        assert a.apply("SSN", "078051120") != a.apply("PHONE", "078051120")

    def test_not_the_value_and_not_re_detected(self) -> None:
        pseudonym = HmacPseudonym(KEY_A).apply("SSN", "078-05-1120")
        assert pseudonym.startswith("[SSN:") and "078" not in pseudonym
        assert ENGINE.scan(f"x {pseudonym} y") == []

    def test_short_key_refused(self) -> None:
        with pytest.raises(ValueError, match="at least 32 bytes"):
            HmacPseudonym(b"short")

    def test_key_not_in_repr(self) -> None:
        assert KEY_A.hex() not in repr(HmacPseudonym(KEY_A)) and repr(KEY_A) not in repr(HmacPseudonym(KEY_A))


class TestAesGcmTokenizer:
    def test_round_trip_only_with_the_key(self) -> None:
        token = AesGcmTokenizer(KEY_A).apply("EMAIL", "john.doe@example.com")
        assert "john" not in token
        assert AesGcmTokenizer(KEY_A).reveal(token) == ("EMAIL", "john.doe@example.com")
        with pytest.raises(ValueError, match="does not authenticate"):
            AesGcmTokenizer(KEY_B).reveal(token)

    def test_type_is_authenticated(self) -> None:
        token = AesGcmTokenizer(KEY_A).apply("EMAIL", "john.doe@example.com")
        with pytest.raises(ValueError, match="does not authenticate"):
            AesGcmTokenizer(KEY_A).reveal(token.replace("[EMAIL:", "[PHONE:"))

    def test_tampering_detected(self) -> None:
        token = AesGcmTokenizer(KEY_A).apply("SSN", "078-05-1120")
        flipped = token[:-3] + ("a" if token[-3] != "a" else "b") + token[-2:]
        with pytest.raises(ValueError, match="does not authenticate"):
            AesGcmTokenizer(KEY_A).reveal(flipped)

    def test_token_bound_to_its_tenant(self) -> None:
        token = AesGcmTokenizer(KEY_A).for_tenant("acme").apply("EMAIL", "john.doe@example.com")
        assert AesGcmTokenizer(KEY_A).for_tenant("acme").reveal(token) == ("EMAIL", "john.doe@example.com")
        for other in ("globex", "", "acme\x01"):
            with pytest.raises(ValueError, match="does not authenticate"):
                AesGcmTokenizer(KEY_A).for_tenant(other).reveal(token)

    def test_random_nonce_unlinkable(self) -> None:
        op = AesGcmTokenizer(KEY_A)
        assert op.apply("SSN", "078-05-1120") != op.apply("SSN", "078-05-1120")

    def test_unmask_text_and_tokens_survive_rescanning(self) -> None:
        op = AesGcmTokenizer(KEY_A)
        masked = ENGINE.mask(TEXT, dict.fromkeys(ENGINE.entities, op))[0]
        assert ENGINE.mask(masked, {e: Replace() for e in ENGINE.entities}) == (masked, {})
        assert op.unmask(masked) == TEXT
        assert AesGcmTokenizer(KEY_B).unmask(masked) == masked  # wrong key: left as tokens

    @pytest.mark.parametrize("bad", ["[EMAIL:tok:abc]", "[EMAIL:tok:zz]", "nonsense", "[EMAIL:tok:" + "a" * 40 + "]"])
    def test_reveal_rejects_garbage(self, bad: str) -> None:
        with pytest.raises(ValueError, match="token"):
            AesGcmTokenizer(KEY_A).reveal(bad)

    def test_key_size_checked(self) -> None:
        with pytest.raises(ValueError, match="16, 24 or 32"):
            AesGcmTokenizer(b"x" * 20)
