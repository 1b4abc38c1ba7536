"""The sanitize stage: per-model caps, and text cleaned into one canonical form before PII masking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from gateway.context import Action, RequestContext
from gateway.errors import GatewayError, InputRejected, PayloadTooLarge
from gateway.kserve import InferRequest, RequestedOutput, Tensor
from gateway.stages.adversarial import InputsPolicy
from gateway.stages.sanitize import (
    InputSanitizer,
    SanitizePolicy,
    TextCleaner,
    TextRules,
    build_sanitize_stage,
    clean_text,
    object_array,
)

ROOT = Path(__file__).resolve().parent.parent.parent
TRITON_REPO = ROOT / "triton_repo"


def _ctx(model: str = "text_echo") -> RequestContext:
    return RequestContext(request_id="r1", revision="rev", action=Action.INFER, transport="test", client_addr="",
                          model=model)


def _text_req(*values: bytes, name: str = "text", model: str = "text_echo") -> InferRequest:
    return InferRequest(model, "", [Tensor(name, "BYTES", (len(values),), object_array(list(values)))],
                        [RequestedOutput("text")], id="req-1")


def _stage(policy: dict[str, Any] | None = None) -> InputSanitizer:
    return build_sanitize_stage(SanitizePolicy.model_validate(policy or {}), TRITON_REPO)


def _cleaner(**rules: Any) -> TextCleaner:
    return TextCleaner.build(TextRules.model_validate(rules))


# --------------------------------------------------------------------------- text rules

TEXT_CASES: list[tuple[str, bytes, dict[str, Any], bytes | str]] = [
    # (case, element, rules, expected bytes or refusal reason)
    ("plain ascii", b"hello world", {}, b"hello world"),
    ("whitespace controls allowed", b"tab\there\r\nline", {}, b"tab\there\r\nline"),
    ("zero-width space and joiner removed (PII-02)",
     "john\u200b.doe@exa\u200dmple.com".encode(), {}, b"john.doe@example.com"),
    ("soft hyphen removed", "john\u00ad.doe@example.com".encode(), {}, b"john.doe@example.com"),
    ("BOM inside text removed", "\ufeffhello".encode(), {}, b"hello"),
    ("bidi override removed (Trojan Source)", "abc\u202edcba\u202c".encode(), {}, b"abcdcba"),
    ("tag characters removed", "hi\U000e0041\U000e0042".encode(), {}, b"hi"),
    ("fullwidth folded by NFKC", "ｊｏｈｎ．ｄｏｅ＠ｅｘａｍｐｌｅ．ｃｏｍ".encode(), {}, b"john.doe@example.com"),
    ("fullwidth digits folded", "０７８-０５-１１２０".encode(), {}, b"078-05-1120"),
    ("ligature folded", "ﬁle".encode(), {}, b"file"),
    ("removal then composition", "e\u200b\u0301".encode(), {}, "\u00e9".encode()),
    ("NFC keeps compatibility forms", "ｊｏｈｎ".encode(), {"normalize": "NFC"}, "ｊｏｈｎ".encode()),
    ("no normalisation", "e\u0301".encode(), {"normalize": "none"}, "e\u0301".encode()),
    ("non-ascii unchanged", "Grüße, 東京 \U0001f600".encode(), {}, "Grüße, 東京 \U0001f600".encode()),
    ("format chars allowed on request", "a\u200bb".encode(), {"format_chars": "allow"}, "a\u200bb".encode()),
    ("format chars refused on request", "a\u200bb".encode(), {"format_chars": "refuse"}, "input_format_chars"),
    ("NUL refused (Triton truncates at NUL)", b"ok\x00<payload>", {}, "input_nul_byte"),
    ("NUL refused even when controls are removed", b"ok\x00x", {"control_chars": "remove"}, "input_nul_byte"),
    ("bell refused", b"a\x07b", {}, "input_control_chars"),
    ("DEL refused", b"a\x7fb", {}, "input_control_chars"),
    ("C1 control refused", "a\u0085b".encode(), {}, "input_control_chars"),
    ("line separator refused", "a\u2028b".encode(), {}, "input_control_chars"),
    ("tab refused when whitespace is not allowed", b"a\tb", {"allow_whitespace": False}, "input_control_chars"),
    ("ascii control removed on request", b"a\x07b\x1bc", {"control_chars": "remove"}, b"abc"),
    ("non-ascii control removed on request", "é\u0085x".encode(), {"control_chars": "remove"}, "éx".encode()),
    ("invalid utf-8", b"\xff\xfe not text", {}, "input_not_utf8"),
    ("encoded surrogate", b"\xed\xa0\x80", {}, "input_not_utf8"),
    ("overlong encoding of '/'", b"\xc0\xaf", {}, "input_not_utf8"),
    ("truncated sequence", b"caf\xc3", {}, "input_not_utf8"),
]


@pytest.mark.parametrize(("value", "rules", "expected"), [pytest.param(v, r, e, id=c) for c, v, r, e in TEXT_CASES])
def test_text_rules(value: bytes, rules: dict[str, Any], expected: bytes | str) -> None:
    cleaner = _cleaner(**rules)
    if isinstance(expected, str):
        with pytest.raises(InputRejected) as info:
            clean_text(value, cleaner, "input 'text'")
        assert info.value.reason == expected
        assert info.value.http_status == 422
        assert "input 'text'" in info.value.client_message()
    else:
        assert clean_text(value, cleaner, "input 'text'") == expected


def test_unchanged_text_is_the_same_object() -> None:
    value = "Grüße".encode()
    assert clean_text(value, _cleaner(), "x") is value


def test_refusal_never_echoes_the_value() -> None:
    with pytest.raises(InputRejected) as info:
        clean_text(b"john.doe@example.com\x07", _cleaner(), "input 'text'")
    assert "john" not in info.value.client_message()


# --------------------------------------------------------------------------- the stage


async def test_rewrite_builds_a_new_request_and_leaves_the_original_untouched() -> None:
    stage = _stage()
    original = "john\u200b.doe@ｅｘａｍｐｌｅ.com".encode()
    req = _text_req(original, b"plain")
    ctx = _ctx()
    out = await stage.on_request(ctx, req)
    assert out is not req
    assert out.inputs[0].data.tolist() == [b"john.doe@example.com", b"plain"]
    assert out.inputs[0].data[1] is req.inputs[0].data[1]
    assert req.inputs[0].data.tolist() == [original, b"plain"]  # shadow mode relies on this
    assert (out.id, out.outputs, out.model) == (req.id, req.outputs, req.model)
    assert ctx.notes["sanitize"] == {"rewritten_inputs": 1}


async def test_clean_request_passes_through_as_is() -> None:
    stage = _stage()
    req = _text_req(b"hello", "Grüße".encode())
    assert await stage.on_request(_ctx(), req) is req
    digits = InferRequest("digits", "", [Tensor("pixels", "FP32", (1, 64), np.zeros((1, 64), np.float32))])
    assert await stage.on_request(_ctx("digits"), digits) is digits


async def test_binary_inputs_skip_text_rules_but_not_caps() -> None:
    stage = _stage({"defaults": {"binary_inputs": ["text"], "caps": {"max_bytes_element": 4}}})
    req = _text_req(b"\xff\x00\x01")
    assert await stage.on_request(_ctx(), req) is req
    with pytest.raises(PayloadTooLarge):
        await stage.on_request(_ctx(), _text_req(b"\xff\x00\x01\x02\x03"))


def _pixels(rows: int) -> InferRequest:
    return InferRequest("digits", "", [Tensor("pixels", "FP32", (rows, 64), np.ones((rows, 64), np.float32))])


CAP_CASES: list[tuple[str, dict[str, Any], InferRequest, str | None]] = [
    # (case, caps, request, refusal reason or None)
    ("batch at the cap", {"max_batch": 4}, _pixels(4), None),
    ("batch over the cap", {"max_batch": 4}, _pixels(5), "input_batch_too_large"),
    ("elements over the cap", {"max_elements": 128}, _pixels(3), "input_too_large"),
    ("total elements over the cap", {"max_total_elements": 100}, _pixels(2), "input_too_large"),
    ("strings per request over the batch cap", {"max_batch": 2}, _text_req(b"a", b"b", b"c"), "input_batch_too_large"),
    ("element bytes over the cap", {"max_bytes_element": 3}, _text_req(b"abcd"), "input_too_large"),
    ("total bytes over the cap", {"max_bytes_total": 5}, _text_req(b"abc", b"def"), "input_too_large"),
    ("total bytes at the cap", {"max_bytes_total": 6}, _text_req(b"abc", b"def"), None),
]


@pytest.mark.parametrize(("caps", "req", "reason"), [pytest.param(c, r, e, id=i) for i, c, r, e in CAP_CASES])
async def test_caps(caps: dict[str, Any], req: InferRequest, reason: str | None) -> None:
    stage = _stage({"defaults": {"caps": caps}})
    if reason is None:
        assert await stage.on_request(_ctx(req.model), req) is req
        return
    with pytest.raises(PayloadTooLarge) as info:
        await stage.on_request(_ctx(req.model), req)
    assert info.value.reason == reason and info.value.http_status == 413


async def test_normalisation_cannot_inflate_past_the_element_cap() -> None:
    """U+FDFA is 3 bytes and becomes 33 under NFKC: the cap applies to what is forwarded."""
    stage = _stage({"defaults": {"caps": {"max_bytes_element": 1024}}})
    value = "\ufdfa".encode() * 100  # 300 bytes received
    with pytest.raises(PayloadTooLarge, match="after normalisation"):
        await stage.on_request(_ctx(), _text_req(value))


async def test_model_entry_replaces_the_defaults() -> None:
    stage = _stage({"defaults": {"caps": {"max_batch": 1}},
                    "models": {"text_echo": {"caps": {"max_batch": 8}, "text": {"format_chars": "refuse"}}}})
    assert len((await stage.on_request(_ctx(), _text_req(b"a", b"b"))).inputs) == 1
    with pytest.raises(InputRejected, match="invisible"):
        await stage.on_request(_ctx(), _text_req("a\u200bb".encode()))
    with pytest.raises(PayloadTooLarge):
        await stage.on_request(_ctx("digits"), _pixels(2))  # digits falls back to the defaults


async def test_non_bytes_elements_are_refused() -> None:
    data = np.empty(1, dtype=np.object_)
    data[0] = "a str, not bytes"
    req = InferRequest("text_echo", "", [Tensor("text", "BYTES", (1,), data)])
    with pytest.raises(InputRejected, match="byte strings"):
        await _stage().on_request(_ctx(), req)


async def test_unquotable_input_names_are_not_echoed() -> None:
    req = _text_req(b"a\x07", name="078-05-1120")
    with pytest.raises(GatewayError) as info:
        await _stage().on_request(_ctx(), req)
    assert "078" not in info.value.client_message()
    assert "inputs[0]" in info.value.client_message()


# --------------------------------------------------------------------------- policy


def test_shipped_policy_builds() -> None:
    policy = InputsPolicy.model_validate(yaml.safe_load((ROOT / "policies" / "inputs.yaml").read_text()))
    stage = build_sanitize_stage(policy.sanitize, TRITON_REPO)
    assert set(stage.models) == {"digits", "risk", "text_echo"}
    assert stage.models["digits"].caps.max_batch == 64


@pytest.mark.parametrize("policy", [
    pytest.param({"defaults": {"caps": {"max_batchh": 3}}}, id="misspelt-key"),
    pytest.param({"defaults": {"caps": {"max_batch": 0}}}, id="zero-cap"),
    pytest.param({"defaults": {"caps": {"max_batch": "64"}}}, id="string-number"),
    pytest.param({"defaults": {"text": {"normalize": "NFKD"}}}, id="unknown-form"),
    pytest.param({"defaults": {"text": {"format_chars": False}}}, id="yaml-no-as-bool"),
    pytest.param({"mode": "block"}, id="unknown-mode"),
    pytest.param({"models": {"bad name!": {}}}, id="bad-model-name"),
])
def test_invalid_policies_are_refused(policy: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SanitizePolicy.model_validate(policy)


def test_binary_inputs_must_be_bytes_inputs_of_the_model() -> None:
    with pytest.raises(ValueError, match="not a BYTES input"):
        _stage({"models": {"digits": {"binary_inputs": ["pixels"]}}})
    with pytest.raises(ValueError, match="not a BYTES input"):
        _stage({"models": {"text_echo": {"binary_inputs": ["nope"]}}})
    # a model only the upstream serves is not checked against the local repository
    remote = _stage({"models": {"remote_model": {"binary_inputs": ["blob"]}}})
    assert remote.models["remote_model"].binary_inputs == frozenset({"blob"})


async def test_large_text_requests_are_cleaned_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Megabytes of NFKC hold the GIL in long C calls: a worker thread keeps the loop responsive."""
    import asyncio

    threads: list[object] = []
    real = asyncio.to_thread

    async def spy(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        threads.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    stage = _stage()
    many = _text_req(*(["ｆｕｌｌ\u200b".encode()] * 100))
    out = await stage.on_request(_ctx(), many)
    assert set(out.inputs[0].data.tolist()) == {b"full"} and len(threads) == 1
    big = _text_req(("é" * 150_000).encode())  # 300 KB in one element
    assert await stage.on_request(_ctx(), big) is big and len(threads) == 2
    small = _text_req(b"hello")
    assert await stage.on_request(_ctx(), small) is small and len(threads) == 2
