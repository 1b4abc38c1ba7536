"""The client address limits are keyed on: the peer, or the rightmost untrusted forwarded hop."""

from __future__ import annotations

import pytest

from gateway.fronts.client_addr import (
    UNKNOWN,
    TrustedProxies,
    address_bucket,
    client_address,
    parse_ip,
)

PROXIES = TrustedProxies.parse(["10.0.0.0/8", "127.0.0.1", "2001:db8:ffff::/48"])


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        # No trusted proxy configured: the header is the client's own claim (RL-02).
        ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
        # Untrusted peer with a forged chain that even names a trusted proxy.
        ("203.0.113.7", ["198.51.100.1, 10.0.0.1"], "203.0.113.7"),
        # Trusted proxy: the rightmost hop it reports is the client.
        ("10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
        # Client prepended garbage and a fake address: only the rightmost untrusted hop counts.
        ("10.0.0.5", ["1.1.1.1, 198.51.100.9"], "198.51.100.9"),
        # Two proxies of ours in a row are skipped.
        ("10.0.0.5", ["198.51.100.2, 10.1.2.3"], "198.51.100.2"),
        # Several header lines mean one comma-joined list, in order (RFC 9110 §5.3).
        ("10.0.0.5", ["6.6.6.6", "198.51.100.3"], "198.51.100.3"),
        ("10.0.0.5", ["198.51.100.3", "10.9.9.9"], "198.51.100.3"),
        # IPv4-mapped IPv6 equals IPv4, both as hop and as trusted peer (RL-03).
        ("10.0.0.5", ["1.2.3.4 , ::ffff:198.51.100.4"], "198.51.100.4"),
        ("::ffff:10.0.0.5", ["198.51.100.4"], "198.51.100.4"),
        ("::ffff:203.0.113.9", ["198.51.100.4"], "203.0.113.9"),
        # Ports and brackets are dropped.
        ("10.0.0.5", ["198.51.100.5:5555"], "198.51.100.5"),
        ("10.0.0.5", ["[2001:db8::1]:443"], "2001:db8::1"),
        # A malformed hop stops the walk at the nearest trusted hop (no fresh buckets from garbage).
        ("10.0.0.5", ["198.51.100.6, unknown"], "10.0.0.5"),
        ("10.0.0.5", ["198.51.100.6, _hidden, 10.2.2.2"], "10.2.2.2"),
        ("10.0.0.5", ["198.51.100.6,,"], "10.0.0.5"),
        ("10.0.0.5", [""], "10.0.0.5"),
        ("10.0.0.5", ["010.0.0.1"], "10.0.0.5"),
        # Everything trusted: the leftmost (origin) hop.
        ("10.0.0.5", ["10.3.3.3, 127.0.0.1"], "10.3.3.3"),
        # Trusted peer, no header: the proxy itself.
        ("127.0.0.1", [], "127.0.0.1"),
        # IPv6 trusted proxy network.
        ("2001:db8:ffff::10", ["2001:db8:1::7"], "2001:db8:1::7"),
        # Zone ids are dropped so one host is one address.
        ("fe80::1%eth0", [], "fe80::1"),
        # No usable peer (a Unix socket without a trusted local proxy).
        ("", ["198.51.100.1"], UNKNOWN),
        (None, [], UNKNOWN),
    ],
)
def test_client_address(peer: str | None, xff: list[str], expected: str) -> None:
    assert client_address(peer, xff, PROXIES) == expected


def test_a_unix_socket_peer_is_trusted_only_when_configured() -> None:
    local = TrustedProxies.parse([], unix_socket=True)
    assert client_address("", ["198.51.100.1"], local) == "198.51.100.1"
    assert client_address("", [], local) == UNKNOWN
    assert client_address("", ["198.51.100.1"], TrustedProxies()) == UNKNOWN


def test_rotating_forwarded_for_values_from_one_socket_is_one_client() -> None:
    """RL-02: 200 spoofed XFF values from one untrusted peer key on the peer."""
    seen = {client_address("203.0.113.50", [f"198.51.100.{i}"], PROXIES) for i in range(1, 201)}
    assert seen == {"203.0.113.50"}


def test_only_the_rightmost_hops_are_examined() -> None:
    hops = ", ".join(["10.0.0.1"] * 1000 + ["198.51.100.8"])
    assert client_address("10.0.0.5", [hops], PROXIES) == "198.51.100.8"
    all_trusted = ", ".join(["10.0.0.1"] * 1000)
    assert client_address("10.0.0.5", [all_trusted], PROXIES) == "10.0.0.1"


@pytest.mark.parametrize(
    "entry",
    ["0.0.0.0/0", "::/0", "10.0.0.1/8", "not-an-ip", "10.0.0.0/33"],
)
def test_dangerous_or_mistyped_trusted_proxies_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="trusted proxy"):
        TrustedProxies.parse([entry])


def test_ipv4_mapped_trusted_networks_trust_the_ipv4_peer() -> None:
    trusted = TrustedProxies.parse(["::ffff:10.0.0.0/104"])
    assert client_address("10.1.1.1", ["198.51.100.1"], trusted) == "198.51.100.1"


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [("1.2.3.4", "1.2.3.4"), (" 1.2.3.4 ", "1.2.3.4"), ("1.2.3.4:80", "1.2.3.4"), ("[::1]", "::1"),
     ("[::1]:8080", "::1"), ("::ffff:1.2.3.4", "1.2.3.4"), ("[::1]x", None), ("1.2.3.4:x", None),
     ("unknown", None), ("", None), ("a" * 100, None), ("1.2.3", None), ("[::1", None)],
)
def test_parse_ip(raw: str, parsed: str | None) -> None:
    result = parse_ip(raw)
    assert (str(result) if result is not None else None) == parsed


@pytest.mark.parametrize(
    ("addr", "prefix", "bucket"),
    [("198.51.100.1", 64, "198.51.100.1"),
     ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
     ("2001:db8:1:2:bbbb::9", 64, "2001:db8:1:2::/64"),
     ("2001:db8:1:2:bbbb::9", 48, "2001:db8:1::/48"),
     ("2001:db8:1:2:bbbb::9", 128, "2001:db8:1:2:bbbb::9"),
     ("::ffff:198.51.100.1", 64, "198.51.100.1"),
     ("unknown", 64, UNKNOWN)],
)
def test_address_bucket_groups_an_ipv6_subscriber(addr: str, prefix: int, bucket: str) -> None:
    assert address_bucket(addr, prefix) == bucket
