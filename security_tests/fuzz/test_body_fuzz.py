"""The HTTP body reader under fuzz: any bytes, any coding, any chunking; bombs stay bounded."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from security_tests.fuzz import targets
from security_tests.fuzz.corpus_examples import with_corpus
from security_tests.fuzz.profiles import fuzz_settings

CODINGS = st.one_of(st.none(), st.sampled_from([b"gzip", b"x-gzip", b"deflate", b"identity", b"GZIP", b"br",
                                                b"zstd", b"gzip, gzip", b"gzip,", b" , ", b"compress"]),
                    st.binary(max_size=8).map(lambda b: b.replace(b"\n", b"")))


@fuzz_settings()
@given(data=st.binary(max_size=4096), chunk=st.integers(1, 8192), declare=st.booleans())
@with_corpus("http_body", chunk=4096, declare=False)
def test_read_body_arbitrary(data: bytes, chunk: int, declare: bool) -> None:
    """Returns at most the cap or refuses with a GatewayError (413/415/400)."""
    targets.http_body(data, chunk=chunk, declare_length=declare)


@fuzz_settings()
@given(coding=CODINGS, payload=st.binary(max_size=2048), chunk=st.integers(1, 4096), cut=st.integers(0, 4096),
       flip=st.integers(0, 255))
def test_read_body_corrupted_streams(coding: bytes | None, payload: bytes, chunk: int, cut: int, flip: int) -> None:
    """Compressed streams cut short or with one byte changed never escape the taxonomy."""
    stream = zlib.compress(payload) if coding == b"deflate" else gzip.compress(payload)
    position = cut % (len(stream) + 1)
    for mutated in (stream[:position], stream[:position] + bytes([flip]) + stream[position + 1:]):
        targets.http_body(targets.frame(b"CE", coding, mutated), chunk=chunk)


@fuzz_settings()
@given(coding=st.sampled_from([b"gzip", b"x-gzip", b"deflate"]), payload=st.binary(max_size=8192),
       repeat=st.integers(1, 16), chunk=st.integers(1, 8192))
def test_compressed_round_trip_and_cap(coding: bytes, payload: bytes, repeat: int, chunk: int) -> None:
    """Whatever compresses to under the cap comes back byte for byte; larger is refused."""
    plain = payload * repeat
    stream = zlib.compress(plain) if coding == b"deflate" else gzip.compress(plain)
    body = targets.http_body(targets.frame(b"CE", coding, stream), chunk=chunk)
    if len(plain) <= targets.BODY_CAP:
        assert body == plain
    else:
        assert body is None


@pytest.mark.parametrize("coding", [b"gzip", b"deflate"])
def test_decompression_bomb_memory_is_bounded(coding: bytes) -> None:
    """64 MiB of zeros (about 64 KiB compressed) against a 64 KiB cap: refused, peak memory
    a small multiple of the cap, never of the bomb."""
    zeros = b"\0" * (64 << 20)
    bomb = zlib.compress(zeros, 9) if coding == b"deflate" else gzip.compress(zeros, 9)
    del zeros
    tracemalloc.start()
    try:
        result = targets.http_body(targets.frame(b"CE", coding, bomb), chunk=64 * 1024)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result is None
    assert peak < 2 * len(bomb) + 16 * targets.BODY_CAP, f"peak {peak} bytes"
