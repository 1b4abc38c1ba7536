"""Which client a request comes from, for limits keyed on the client address.

Transport-neutral and pure: a front passes the socket peer and the raw
``X-Forwarded-For`` header values; no other header is ever read.

The rule (Envoy's ``xff_num_trusted_hops``, nginx ``real_ip_recursive``, aiohttp-remotes
``XForwardedStrict``): the peer is the client unless it is a proxy the *settings* trust.
Each proxy appends the address it received the connection from, so walking
``X-Forwarded-For`` from the right and skipping trusted proxies, the first untrusted hop
is the nearest address nobody we trust vouches beyond: that is the client. Everything to
its left was written by the client and may be forged (catalogue RL-02/RL-03).

Addresses are canonical: ``::ffff:192.0.2.1`` is ``192.0.2.1``, ports, brackets and
IPv6 zone ids are dropped, so one host cannot look like several.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Final

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

UNKNOWN: Final = "unknown"
# Only the rightmost hops matter; a longer header is client-written padding.
MAX_HOPS: Final = 32


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """The proxies whose ``X-Forwarded-For`` entries are believed. Empty: trust none."""

    networks: tuple[IPNetwork, ...] = ()
    # A peer on a Unix socket has no address; trust it only when a local proxy owns the socket.
    unix_socket: bool = False

    @classmethod
    def parse(cls, entries: Iterable[str], *, unix_socket: bool = False) -> TrustedProxies:
        """Parse ``10.0.0.0/8``, ``127.0.0.1``, ``::1``... Raises ``ValueError`` with the bad entry.

        # SECURITY: a prefix of length 0 would trust every peer, making the header entirely
        # client-controlled; host bits set (``10.0.0.1/8``) is almost always a typo. Both refused.
        """
        networks: list[IPNetwork] = []
        for entry in entries:
            text = entry.strip()
            try:
                net = ip_network(text, strict=True)
            except ValueError as exc:
                raise ValueError(f"trusted proxy {text!r} is not an address or network: {exc}") from exc
            if net.prefixlen == 0:
                raise ValueError(f"trusted proxy {text!r} would trust every address")
            if isinstance(net, IPv6Network) and net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
                mapped = net.network_address.ipv4_mapped
                net = IPv4Network(f"{mapped}/{net.prefixlen - 96}")
            networks.append(net)
        return cls(tuple(networks), unix_socket)

    def trusts(self, addr: IPAddress) -> bool:
        return any(addr.version == net.version and addr in net for net in self.networks)


NO_PROXIES: Final = TrustedProxies()


def parse_ip(value: str) -> IPAddress | None:
    """One address as proxies write it (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:443``, ``fe80::1%eth0``).

    Returns ``None`` for anything else (``unknown``, obfuscated ids, garbage).
    """
    text = value.strip()
    if not text or len(text) > 64:
        return None
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1:] if end > 0 else "x"
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        host = text[1:end]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
    else:
        host = text
    host = host.partition("%")[0]
    try:
        addr = ip_address(host)
    except ValueError:
        return None
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_address(peer: str | None, forwarded_for: Sequence[str] = (),
                   trusted: TrustedProxies = NO_PROXIES) -> str:
    """The canonical client address: the peer, or the rightmost untrusted forwarded hop.

    ``forwarded_for`` holds every ``X-Forwarded-For`` field line in order; several lines
    mean the same as one comma-joined line (RFC 9110 §5.3).
    """
    peer_ip = parse_ip(peer) if peer else None
    if peer_ip is None:
        if not (trusted.unix_socket and not peer):
            return UNKNOWN
    elif not trusted.trusts(peer_ip):
        # SECURITY: an untrusted peer's forwarding headers are its own claims: ignored.
        return str(peer_ip)
    hops: list[str] = []
    for line in forwarded_for:
        hops.extend(line.split(","))
    client = peer_ip
    for raw in reversed(hops[-MAX_HOPS:]):
        hop = parse_ip(raw)
        if hop is None:
            # SECURITY: a malformed hop was written by the client: stop and key on the nearest
            # address a trusted proxy reported, so rotating garbage cannot mint new buckets.
            break
        client = hop
        if not trusted.trusts(hop):
            return str(hop)
    return str(client) if client is not None else UNKNOWN


def address_bucket(addr: str, ipv6_prefix: int = 64) -> str:
    """The unit a per-address limit counts: an IPv4 address, or an IPv6 prefix.

    # SECURITY: one IPv6 subscriber usually holds a whole /64 (2^64 addresses); keying on
    # the full address would hand every attacker unlimited fresh buckets.
    """
    ip = parse_ip(addr)
    if ip is None:
        return UNKNOWN
    if isinstance(ip, IPv6Address) and ipv6_prefix < 128:
        return str(IPv6Network(f"{ip}/{ipv6_prefix}", strict=False))
    return str(ip)
