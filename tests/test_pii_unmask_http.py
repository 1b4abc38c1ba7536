"""``POST /v2/pii/unmask`` over HTTP: the way back from reversible tokens, for pii:unmask only."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.app import build_app
from gateway.settings import Settings

from .conftest import Client, GatewayTestServer
from .test_http_front import audit_records, audit_text

EMAIL = "john.doe@example.com"
SSN = "078-05-1120"
SENT = f"Contact {EMAIL}, SSN {SSN}."
TOKEN = re.compile(r"\[[A-Z]+:tok:[a-p]+\]")
UNMASK = "/v2/pii/unmask"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def echo_body(*texts: str) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": list(texts)}]}


async def tokenized(client: Client, headers: dict[str, str]) -> str:
    """What an admin (tokenize operators in the shipped pii.yaml) gets back from text_echo."""
    resp = await client.post("/v2/models/text_echo/infer", json=echo_body(SENT), headers=headers)
    assert resp.status == 200, await resp.text()
    [text] = (await resp.json())["outputs"][0]["data"]
    assert EMAIL not in text and SSN not in text
    assert len(TOKEN.findall(text)) == 2
    return str(text)


async def test_tokens_and_text_unmasked_for_their_tenant(client: Client, token: Callable[..., str]) -> None:
    admin = bearer(token(sub="root", roles=("admin",)))
    text = await tokenized(client, admin)
    tokens = TOKEN.findall(text)
    resp = await client.post(UNMASK, json={"tokens": tokens}, headers=admin)
    assert resp.status == 200, await resp.text()
    assert (await resp.json()) == {"values": [{"entity": "EMAIL", "value": EMAIL}, {"entity": "SSN", "value": SSN}]}
    resp = await client.post(UNMASK, json={"text": f"model said: {text}"}, headers=admin)
    assert resp.status == 200
    assert (await resp.json()) == {"text": f"model said: {SENT}"}
    resp = await client.post(UNMASK, json={"text": "no tokens here"}, headers=admin)
    assert (await resp.json()) == {"text": "no tokens here"}


async def test_audited_with_count_and_types_never_values(client: Client, token: Callable[..., str],
                                                         settings: Settings) -> None:
    admin = bearer(token(sub="root", roles=("admin",)))
    tokens = TOKEN.findall(await tokenized(client, admin))
    assert (await client.post(UNMASK, json={"tokens": tokens + tokens[:1]}, headers=admin)).status == 200
    [record] = [r for r in audit_records(settings) if r["route"] == UNMASK]
    assert record["status"] == 200
    assert record["notes"]["pii_unmask"] == {"count": 3, "entities": {"EMAIL": 2, "SSN": 1}}
    trail = audit_text(settings)
    assert EMAIL not in trail and SSN not in trail
    assert not any(t in trail for t in tokens)


async def test_token_of_another_tenant_refused(client: Client, token: Callable[..., str]) -> None:
    tokens = TOKEN.findall(await tokenized(client, bearer(token(sub="root", roles=("admin",)))))
    globex_admin = bearer(token(sub="boss", tenant="globex", roles=("admin",)))
    for body in ({"tokens": tokens}, {"text": f"x {tokens[0]} y"}):
        resp = await client.post(UNMASK, json=body, headers=globex_admin)
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert "not a valid PII token for this tenant" in error
        assert EMAIL not in error and tokens[0] not in error


async def test_forged_or_edited_tokens_are_400(client: Client, token: Callable[..., str]) -> None:
    admin = bearer(token(sub="root", roles=("admin",)))
    [email_token, ssn_token] = TOKEN.findall(await tokenized(client, admin))
    edited = email_token[:-3] + ("a" if email_token[-3] != "a" else "b") + email_token[-2:]
    retyped = email_token.replace("[EMAIL:", "[PHONE:")
    forged = "[EMAIL:tok:" + "ab" * 40 + "]"
    for bad in (edited, retyped, forged, "[EMAIL:tok:abc]", "john.doe@example.com"):
        resp = await client.post(UNMASK, json={"tokens": [ssn_token, bad]}, headers=admin)
        assert resp.status == 400, bad
        assert "tokens[1] is not a valid PII token for this tenant" in (await resp.json())["error"]
        assert SSN not in await resp.text()  # nothing revealed from a request holding a bad token


async def test_malformed_bodies(client: Client, token: Callable[..., str]) -> None:
    admin = bearer(token(sub="root", roles=("admin",)))
    bodies: list[Any] = [{}, {"tokens": []}, {"tokens": "x"}, {"tokens": [1]}, {"text": 3},
                         {"text": "a", "tokens": ["b"]}, ["x"]]
    for body in bodies:
        resp = await client.post(UNMASK, json=body, headers=admin)
        assert resp.status == 400, body
    resp = await client.post(UNMASK, data=b"{not json", headers={**admin, "Content-Type": "application/json"})
    assert resp.status == 400
    resp = await client.post(UNMASK, data=b"{}", headers={**admin, "Content-Type": "application/octet-stream"})
    assert resp.status == 415
    resp = await client.post(UNMASK, json={"tokens": ["x"] * 1001}, headers=admin)
    assert resp.status == 400
    assert "at most 1000" in (await resp.json())["error"]


async def test_only_pii_unmask_holders(client: Client, token: Callable[..., str]) -> None:
    tokens = TOKEN.findall(await tokenized(client, bearer(token(sub="root", roles=("admin",)))))
    # analysts get type tags, not tokens, and may not unmask: hidden like an unknown route
    resp = await client.post("/v2/models/text_echo/infer", json=echo_body(SENT), headers=bearer(token()))
    assert (await resp.json())["outputs"][0]["data"] == ["Contact [EMAIL], SSN [SSN]."]
    denied = await client.post(UNMASK, json={"tokens": tokens}, headers=bearer(token()))
    unknown = await client.post("/v2/pii/nothing", json={"tokens": tokens}, headers=bearer(token()))
    assert denied.status == unknown.status == 404
    assert (await client.post(UNMASK, json={"tokens": tokens})).status == 401
    assert (await client.get(UNMASK, headers=bearer(token(sub="root", roles=("admin",))))).status == 405


async def test_body_read_one_way_only(client: Client, token: Callable[..., str]) -> None:
    """s8 probe: the unmask body was read with ``json.loads(bytes)``: a repeated member kept
    the last one (a first-wins proxy or log parser sees another request) and UTF-16 was
    sniffed and accepted. The inference body refuses both; so does this one now."""
    admin = bearer(token(sub="root", roles=("admin",)))
    [email_token, _] = TOKEN.findall(await tokenized(client, admin))
    headers = {**admin, "Content-Type": "application/json"}
    single = '{"tokens": ["' + email_token + '"]}'
    repeated = ('{"tokens": ["[EMAIL:tok:abc]"], "tokens": ["' + email_token + '"]}').encode()
    for body in (repeated, single.encode("utf-16"),
                 b'{"text": "a", "text": "b"}', b'\xef\xbb\xbf{"text": "a"}'):
        resp = await client.post(UNMASK, data=body, headers=headers)
        assert resp.status == 400, body[:40]
        assert EMAIL not in await resp.text()
    resp = await client.post(UNMASK, data=single.encode(), headers=headers)
    assert resp.status == 200 and (await resp.json())["values"][0]["value"] == EMAIL


async def test_a_slow_body_gets_the_body_deadline_too(settings: Settings, token: Callable[..., str],
                                                      aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
    """s8 probe: the body deadline (limits.body_timeout_s, HTTP-13) was applied on the infer
    route only; this route read its body without one, so a client that sent one byte held
    the connection and its handler for as long as it liked. Now 408 ``body_timeout``."""
    gateway_yaml = settings.policies / "gateway.yaml"
    gateway_yaml.write_text(gateway_yaml.read_text().replace("  max_inputs: 64\n",
                                                             "  max_inputs: 64\n  body_timeout_s: 1\n"))
    client = await aiohttp_client(GatewayTestServer(build_app(settings)))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write((f"POST {UNMASK} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
                  f"{token(sub='root', roles=('admin',))}\r\nContent-Type: application/json\r\n"
                  "Content-Length: 1000\r\n\r\n{").encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), 20)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert [(r["status"], r["reason"]) for r in audit_records(settings) if r["route"] == UNMASK] == \
        [(408, "body_timeout")]
