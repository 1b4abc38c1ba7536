"""TLS everywhere: the HTTPS and gRPC fronts (TLS, optional and required client
certificates) and the TLS/mTLS channel to a Triton upstream.

Certificates are generated per module with ``cryptography`` (tests/support/certs.py); no
key material lives in the repository. Protocol checks use a raw ``ssl`` client so the
refusal is visibly the server's: a permissive control server shows the same client can
speak TLS 1.1 and CBC suites.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import ssl
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.errors import UpstreamUnavailable
from gateway.kserve import InferRequest, ModelMetadata, Tensor, TensorSpec
from gateway.tls import TlsSettings, grpc_channel_credentials, grpc_server_credentials, server_ssl_context
from gateway.upstream.triton_grpc import TritonGrpcUpstream
from tests.conftest import DIGIT_ZERO
from tests.e2e.test_both_fronts import GatewayThread, gateway_settings
from tests.support.certs import TestPki, make_pki
from tests.support.fake_triton import FakeTriton, _Servicer
from tests.support.raw_http import closed_by_server

DIGITS = ModelMetadata(name="digits", versions=("1",), platform="onnxruntime_onnx",
                       inputs=(TensorSpec("pixels", "FP32", (-1, 64)),),
                       outputs=(TensorSpec("probabilities", "FP32", (-1, 10)),))
# A real digit: the input policy refuses constant or off-grid images.
DIGIT = np.asarray([DIGIT_ZERO], dtype=np.float32)
CBC_SUITES = "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:AES128-SHA:AES256-SHA256"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _gateway(tmp_path_factory: pytest.TempPathFactory, tls: TlsSettings) -> Iterator[GatewayThread]:
    gw = GatewayThread(gateway_settings(tmp_path_factory.mktemp("gw")), tls=tls).start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def tls_gw(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    """Server certificate only."""
    yield from _gateway(tmp_path_factory, TlsSettings(cert=pki.server.cert, key=pki.server.key))


@pytest.fixture(scope="module")
def mtls_gw(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    """A client certificate from the CA is required."""
    yield from _gateway(tmp_path_factory, TlsSettings(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca,
                                                      require_client_cert=True))


@pytest.fixture(scope="module")
def optional_gw(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    """Client certificates verified when presented, not required."""
    yield from _gateway(tmp_path_factory, TlsSettings(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca))


def _legacy_versions(ctx: ssl.SSLContext, lowest: str, highest: str) -> None:
    """Python deprecates naming TLS 1.0/1.1 at all; these tests must, to offer them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = getattr(ssl.TLSVersion, lowest)
        ctx.maximum_version = getattr(ssl.TLSVersion, highest)


def client_context(pki: TestPki, *, versions: tuple[str, str] | None = None, ciphers: str | None = None,
                   cert: Any = None, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca)
    if versions is not None:
        _legacy_versions(ctx, *versions)
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def handshake(port: int, ctx: ssl.SSLContext) -> tuple[str | None, str | None, str | None]:
    """(version, cipher, compression) of a completed handshake; raises ssl.SSLError if refused."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        cipher = tls.cipher()
        return tls.version(), cipher[0] if cipher else None, tls.compression()


@contextlib.contextmanager
def permissive_server(pki: TestPki) -> Iterator[int]:
    """Control: a server that accepts TLS 1.0-1.3 and any suite, for one connection."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server.cert, pki.server.key)
    _legacy_versions(ctx, "TLSv1", "TLSv1_3")
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(timeout=5)


def _port(gw: GatewayThread, front: str) -> int:
    return gw.http_port if front == "http" else gw.grpc_port


def _alpn(front: str) -> list[str] | None:
    return ["h2"] if front == "grpc" else None


# ---------------------------------------------------------------------------------------
# Settings and contexts
# ---------------------------------------------------------------------------------------


class TestSettings:
    def test_required_client_cert_needs_a_ca(self, pki: TestPki) -> None:
        with pytest.raises(ValueError, match="client_ca"):
            TlsSettings(cert=pki.server.cert, key=pki.server.key, require_client_cert=True)

    def test_server_context(self, pki: TestPki) -> None:
        ctx = server_ssl_context(TlsSettings(cert=pki.server.cert, key=pki.server.key))
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        for flag in (ssl.OP_NO_COMPRESSION, ssl.OP_NO_RENEGOTIATION, ssl.OP_NO_TICKET):
            assert ctx.options & flag
        assert ctx.verify_mode == ssl.CERT_NONE
        tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12 and all(c["aead"] and c["kea"] == "kx-ecdhe" for c in tls12)

    def test_client_verification_modes(self, pki: TestPki) -> None:
        base = {"cert": pki.server.cert, "key": pki.server.key, "client_ca": pki.ca}
        assert server_ssl_context(TlsSettings(**base)).verify_mode == ssl.CERT_OPTIONAL
        assert server_ssl_context(TlsSettings(**base, require_client_cert=True)).verify_mode == ssl.CERT_REQUIRED

    def test_key_that_does_not_match_is_fatal(self, pki: TestPki) -> None:
        with pytest.raises(ssl.SSLError):
            server_ssl_context(TlsSettings(cert=pki.server.cert, key=pki.client.key))

    def test_missing_file_is_fatal(self, pki: TestPki, tmp_path: Path) -> None:
        with pytest.raises(OSError):
            server_ssl_context(TlsSettings(cert=tmp_path / "nope.pem", key=pki.server.key))
        with pytest.raises(OSError):
            grpc_server_credentials(TlsSettings(cert=tmp_path / "nope.pem", key=pki.server.key))

    def test_upstream_client_pair_must_be_complete(self, pki: TestPki) -> None:
        with pytest.raises(ValueError, match="both"):
            grpc_channel_credentials(pki.ca, cert=pki.client.cert)


# ---------------------------------------------------------------------------------------
# Protocol versions and suites, on both fronts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("front", ["http", "grpc"])
class TestProtocol:
    @pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
    def test_modern_tls_works(self, tls_gw: GatewayThread, pki: TestPki, front: str, version: str) -> None:
        got, cipher, compression = handshake(_port(tls_gw, front), client_context(
            pki, versions=(version, version), alpn=_alpn(front)))
        assert got == version.replace("_", ".")
        assert compression is None
        assert cipher is not None and ("GCM" in cipher or "CHACHA20" in cipher)

    def test_tls_1_1_is_refused(self, tls_gw: GatewayThread, pki: TestPki, front: str) -> None:
        ctx = client_context(pki, versions=("TLSv1", "TLSv1_1"), ciphers="ALL:@SECLEVEL=0", alpn=_alpn(front))
        with permissive_server(pki) as control:
            assert handshake(control, ctx)[0] == "TLSv1.1"  # this client can speak TLS 1.1
        with pytest.raises(ssl.SSLError):
            handshake(_port(tls_gw, front), ctx)

    def test_cbc_suites_are_refused(self, tls_gw: GatewayThread, pki: TestPki, front: str) -> None:
        ctx = client_context(pki, versions=("TLSv1_2", "TLSv1_2"), ciphers=CBC_SUITES + ":@SECLEVEL=0",
                             alpn=_alpn(front))
        with permissive_server(pki) as control:
            assert "GCM" not in str(handshake(control, ctx)[1])
        with pytest.raises(ssl.SSLError):
            handshake(_port(tls_gw, front), ctx)

    def test_plaintext_is_not_answered(self, tls_gw: GatewayThread, front: str) -> None:
        with socket.create_connection(("127.0.0.1", _port(tls_gw, front)), timeout=5) as raw:
            raw.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert not raw.recv(1024).startswith(b"HTTP/")


# ---------------------------------------------------------------------------------------
# The HTTPS front
# ---------------------------------------------------------------------------------------


def _digits_http(client: httpclient.InferenceServerClient, token: str) -> np.ndarray:
    inp = httpclient.InferInput("pixels", [1, 64], "FP32")
    inp.set_data_from_numpy(DIGIT)
    result = client.infer("digits", [inp], headers={"Authorization": f"Bearer {token}"})
    return np.asarray(result.as_numpy("probabilities"))


def _https_client(gw: GatewayThread, pki: TestPki, cert: Any = None) -> httpclient.InferenceServerClient:
    options: dict[str, str] = {"ca_certs": str(pki.ca)}
    if cert is not None:
        options.update(certfile=str(cert.cert), keyfile=str(cert.key))
    return httpclient.InferenceServerClient(gw.http_url, ssl=True, ssl_options=options)


async def _aiohttp_get(gw: GatewayThread, ctx: ssl.SSLContext, path: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, \
            session.get(f"https://127.0.0.1:{gw.http_port}{path}", ssl=ctx, headers=headers) as resp:
        return resp.status


class TestHttps:
    def test_tritonclient_http(self, tls_gw: GatewayThread, pki: TestPki) -> None:
        client = _https_client(tls_gw, pki)
        try:
            assert client.is_server_ready()
            assert _digits_http(client, tls_gw.token()).shape == (1, 10)
        finally:
            client.close()

    def test_aiohttp_client(self, tls_gw: GatewayThread, pki: TestPki) -> None:
        ctx = client_context(pki)
        assert asyncio.run(_aiohttp_get(tls_gw, ctx, "/v2/health/ready")) == 200
        assert asyncio.run(_aiohttp_get(tls_gw, ctx, "/v2/models/digits", tls_gw.token())) == 200
        assert asyncio.run(_aiohttp_get(tls_gw, ctx, "/v2/models/digits")) == 401

    def test_mtls_without_certificate_is_refused(self, mtls_gw: GatewayThread, pki: TestPki) -> None:
        with pytest.raises(aiohttp.ClientError):
            asyncio.run(_aiohttp_get(mtls_gw, client_context(pki), "/v2/health/ready"))
        client = _https_client(mtls_gw, pki)
        try:
            # TLS 1.3: the handshake completes on the client's side, then the server's
            # "certificate required" alert closes the connection before any response.
            with pytest.raises((OSError, http.client.HTTPException)):
                client.is_server_live()
        finally:
            client.close()

    def test_mtls_with_a_foreign_certificate_is_refused(self, mtls_gw: GatewayThread, pki: TestPki) -> None:
        with pytest.raises(aiohttp.ClientError):
            asyncio.run(_aiohttp_get(mtls_gw, client_context(pki, cert=pki.rogue_client), "/v2/health/ready"))

    def test_mtls_with_certificate(self, mtls_gw: GatewayThread, pki: TestPki) -> None:
        assert asyncio.run(_aiohttp_get(mtls_gw, client_context(pki, cert=pki.client), "/v2/health/ready")) == 200
        client = _https_client(mtls_gw, pki, cert=pki.client)
        try:
            assert _digits_http(client, mtls_gw.token()).shape == (1, 10)
        finally:
            client.close()

    def test_optional_client_certificate(self, optional_gw: GatewayThread, pki: TestPki) -> None:
        assert asyncio.run(_aiohttp_get(optional_gw, client_context(pki), "/v2/health/ready")) == 200
        ctx = client_context(pki, cert=pki.client)
        assert asyncio.run(_aiohttp_get(optional_gw, ctx, "/v2/health/ready")) == 200
        with pytest.raises(aiohttp.ClientError):  # presented, so verified
            asyncio.run(_aiohttp_get(optional_gw, client_context(pki, cert=pki.rogue_client), "/v2/health/ready"))


# ---------------------------------------------------------------------------------------
# The gRPC front
# ---------------------------------------------------------------------------------------


def _grpc_client(gw: GatewayThread, pki: TestPki, cert: Any = None) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        gw.grpc_url, ssl=True, root_certificates=str(pki.ca),
        private_key=str(cert.key) if cert else None, certificate_chain=str(cert.cert) if cert else None)


def _digits_grpc(client: Any, token: str) -> Any:
    inp = grpcclient.InferInput("pixels", [1, 64], "FP32")
    inp.set_data_from_numpy(DIGIT)
    return client.infer("digits", [inp], headers={"authorization": f"Bearer {token}"})


class TestGrpcTls:
    def test_tritonclient_grpc(self, tls_gw: GatewayThread, pki: TestPki) -> None:
        client = _grpc_client(tls_gw, pki)
        try:
            assert client.is_server_ready()
            assert _digits_grpc(client, tls_gw.token()).as_numpy("probabilities").shape == (1, 10)
        finally:
            client.close()

    def test_tritonclient_grpc_aio(self, tls_gw: GatewayThread, pki: TestPki) -> None:
        async def call() -> bool:
            client = grpcclient_aio.InferenceServerClient(tls_gw.grpc_url, ssl=True, root_certificates=str(pki.ca))
            try:
                return bool(await client.is_model_ready("digits", headers={
                    "authorization": f"Bearer {tls_gw.token()}"}))
            finally:
                await client.close()

        assert asyncio.run(call())

    def test_plaintext_client_is_refused(self, tls_gw: GatewayThread) -> None:
        client = grpcclient.InferenceServerClient(tls_gw.grpc_url)
        try:
            with pytest.raises(InferenceServerException) as info:
                client.is_server_live(client_timeout=5)
            assert info.value.status() == "StatusCode.UNAVAILABLE"
        finally:
            client.close()

    @pytest.mark.parametrize("who", ["no_certificate", "foreign_certificate"])
    def test_mtls_refuses(self, mtls_gw: GatewayThread, pki: TestPki, who: str) -> None:
        client = _grpc_client(mtls_gw, pki, cert=pki.rogue_client if who == "foreign_certificate" else None)
        try:
            with pytest.raises(InferenceServerException) as info:
                client.is_server_live(client_timeout=5)
            assert info.value.status() == "StatusCode.UNAVAILABLE"
        finally:
            client.close()

    def test_mtls_with_certificate(self, mtls_gw: GatewayThread, pki: TestPki) -> None:
        client = _grpc_client(mtls_gw, pki, cert=pki.client)
        try:
            assert _digits_grpc(client, mtls_gw.token()).as_numpy("probabilities").shape == (1, 10)
        finally:
            client.close()

    def test_channel_credentials_helper(self, mtls_gw: GatewayThread, pki: TestPki) -> None:
        async def live() -> bool:
            credentials = grpc_channel_credentials(pki.ca, cert=pki.client.cert, key=pki.client.key)
            async with grpc.aio.secure_channel(mtls_gw.grpc_url, credentials) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                return bool((await stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=5)).live)

        assert asyncio.run(live())


# ---------------------------------------------------------------------------------------
# The upstream channel: TLS and mTLS to a Triton (the scriptable fake, served with TLS)
# ---------------------------------------------------------------------------------------


class TlsFakeTriton(FakeTriton):
    """FakeTriton's servicer on a TLS port (the fake itself serves plaintext only)."""

    def __init__(self, tls: TlsSettings) -> None:
        super().__init__([DIGITS])
        self.tls = tls

    async def start(self, port: int = 0) -> None:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(self), server)
        self.port = int(server.add_secure_port(f"127.0.0.1:{port}", grpc_server_credentials(self.tls)))
        await server.start()
        self._server = server


def _digits_request() -> InferRequest:
    return InferRequest(model="digits", version="", inputs=[
        Tensor("pixels", "FP32", (1, 64), DIGIT.copy())])


class TestUpstreamTls:
    async def test_tls(self, pki: TestPki) -> None:
        async with TlsFakeTriton(TlsSettings(cert=pki.server.cert, key=pki.server.key)) as fake:
            upstream = TritonGrpcUpstream(f"localhost:{fake.port}", ssl=True, root_certificates=str(pki.ca))
            await upstream.start()
            try:
                assert await upstream.server_ready(timeout_s=5)
                response = await upstream.infer(_digits_request(), timeout_s=5)
                assert response.outputs[0].shape == (1, 10)
            finally:
                await upstream.close()

    async def test_untrusted_upstream_is_unavailable(self, pki: TestPki) -> None:
        async with TlsFakeTriton(TlsSettings(cert=pki.server.cert, key=pki.server.key)) as fake:
            upstream = TritonGrpcUpstream(fake.url, ssl=True, root_certificates=str(pki.rogue_ca))
            await upstream.start()
            try:
                with pytest.raises(UpstreamUnavailable):
                    await upstream.server_metadata(timeout_s=3)
                assert fake.counts["ServerMetadata"] == 0
            finally:
                await upstream.close()

    @pytest.mark.parametrize("with_cert", [True, False])
    async def test_mtls(self, pki: TestPki, with_cert: bool) -> None:
        tls = TlsSettings(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca, require_client_cert=True)
        async with TlsFakeTriton(tls) as fake:
            upstream = TritonGrpcUpstream(
                fake.url, ssl=True, root_certificates=str(pki.ca),
                private_key=str(pki.client.key) if with_cert else None,
                certificate_chain=str(pki.client.cert) if with_cert else None)
            await upstream.start()
            try:
                if with_cert:
                    assert (await upstream.model_metadata("digits", "", timeout_s=5)).name == "digits"
                else:
                    with pytest.raises(UpstreamUnavailable):
                        await upstream.model_metadata("digits", "", timeout_s=3)
            finally:
                await upstream.close()


def test_tls_everywhere(pki: TestPki, tmp_path: Path) -> None:
    """tritonclient.grpc --mTLS--> gRPC front --(gateway)--> mTLS --> Triton (fake)."""
    server_tls = TlsSettings(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca, require_client_cert=True)
    gw = GatewayThread(gateway_settings(tmp_path))
    fake = TlsFakeTriton(server_tls)
    gw.run(fake.start())
    gw.upstream = TritonGrpcUpstream(fake.url, ssl=True, root_certificates=str(pki.ca),
                                     private_key=str(pki.client.key), certificate_chain=str(pki.client.cert))
    gw.tls = server_tls
    try:
        gw.start()
        client = _grpc_client(gw, pki, cert=pki.client)
        try:
            result = _digits_grpc(client, gw.token())
            assert result.as_numpy("probabilities").shape == (1, 10)
        finally:
            client.close()
        assert fake.counts["ModelInfer"] == 1
        assert "authorization" not in dict(fake.calls[-1].metadata)
    finally:
        gw.stop(fake.stop())


# ---------------------------------------------------------------------------------------
# AV-09: connections still in their TLS handshake count against the cap, and time out
# ---------------------------------------------------------------------------------------


def _half_open(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that start a TLS handshake (every other one: half a ClientHello) and stall."""
    socks = []
    for i in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        socks.append(sock)
    return socks


async def test_half_open_tls_handshakes_are_capped_and_time_out(pki: TestPki, tmp_path: Path) -> None:
    """asyncio calls the HTTP protocol only once a TLS handshake completes: 1,000 stalled
    handshakes were all held (cap 200) for asyncio's 60 s. They now take a place under the
    cap at accept (beyond it: closed at once) and are closed after the handshake timeout."""
    import dataclasses
    import re

    from gateway.app import build_app, runner_for
    from gateway.fronts.http.connection_cap import GatedSite
    from tests.support.liveness import eventually

    cap, flood, handshake_s = 4, 12, 0.5
    settings = gateway_settings(tmp_path)
    gateway_yaml = settings.policies / "gateway.yaml"
    text = gateway_yaml.read_text()
    text = re.sub(r"^  max_connections: .*\n", "", text, flags=re.MULTILINE)
    gateway_yaml.write_text(text.replace("limits:\n", f"limits:\n  max_connections: {cap}\n", 1))
    settings = dataclasses.replace(settings, tls=TlsSettings(cert=pki.server.cert, key=pki.server.key))
    runner = runner_for(build_app(settings))
    await runner.setup()
    assert settings.tls is not None
    site = GatedSite(runner, "127.0.0.1", 0, ssl_context=server_ssl_context(settings.tls),
                     handshake_timeout_s=handshake_s)
    await site.start()
    port = int(runner.addresses[0][1])
    socks: list[socket.socket] = []
    try:
        socks = await asyncio.to_thread(_half_open, port, flood)
        # Over the cap: closed at once, though their handshake has not even started.
        await eventually(lambda: sum(map(closed_by_server, socks)) >= flood - cap, "over-cap handshakes closed",
                         expected_s=0.1)
        # The held ones: closed by the handshake timeout, not after asyncio's 60 s.
        await eventually(lambda: all(map(closed_by_server, socks)), "stalled handshakes timed out",
                         expected_s=handshake_s)
        # Their places are free again: a real client gets in.
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        async with aiohttp.ClientSession() as session:

            async def live() -> int:
                async with session.get(f"https://localhost:{port}/v2/health/live", ssl=ctx) as resp:
                    return resp.status

            assert await live() == 200
    finally:
        for sock in socks:
            sock.close()
        await runner.cleanup()
