"""Who may read ``/metrics`` (CATALOGUE SEC-09), and the metrics-only listener.

Metrics name models, routes, refusal reasons, budgets and load: reconnaissance for an
attacker. On the main listener ``/metrics`` is served only to the networks of
``gateway.yaml`` ``metrics.allow_from`` (loopback by default); anyone else gets 403,
logged and counted in ``gateway_metrics_denied_total``. ``--metrics-listen HOST:PORT``
adds a listener that serves nothing but ``/metrics``; there, the bind address and the
network (a Kubernetes NetworkPolicy) decide who reaches it, and the Host header must be an
IP address, ``localhost`` or a name of ``http.allowed_hosts`` (DNS rebinding, below).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

import structlog
from aiohttp import web

from gateway.errors import GatewayError
from gateway.fronts.client_addr import TrustedProxies, client_address, parse_ip
from gateway.fronts.http.protocol import request_host, set_server_header
from gateway.observability.metrics import Metrics

log = structlog.get_logger("gateway.metrics_access")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@functools.lru_cache(maxsize=16)
def _networks(allow_from: tuple[str, ...]) -> tuple[IPv4Network | IPv6Network, ...]:
    return tuple(ip_network(entry, strict=True) for entry in allow_from)


def metrics_allowed(peer: str | None, forwarded_for: Sequence[str], trusted: TrustedProxies,
                    allow_from: tuple[str, ...]) -> tuple[bool, str]:
    """Whether this client may scrape, and the address the decision was made on.

    # SECURITY: the address is the socket peer; ``X-Forwarded-For`` counts only when the
    # peer is a trusted proxy (client_addr.py), so a remote client writing
    # ``X-Forwarded-For: 127.0.0.1`` stays remote. A loopback reverse proxy that forwards
    # outside traffic must therefore be listed with ``--trusted-proxy``.
    """
    addr = client_address(peer, forwarded_for, trusted)
    ip = parse_ip(addr)
    if ip is None:
        return False, addr
    return any(ip.version == net.version and ip in net for net in _networks(allow_from)), addr


def render(metrics: Metrics) -> web.Response:
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def scrape_host_allowed(host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a metrics-only listener answers a request naming ``host``.

    # SECURITY: DNS rebinding. A page in a browser on the scraping host can point a name
    # it controls at 127.0.0.1 and read a loopback listener as same-origin; the browser
    # then sends that name as Host. An IP literal (what Prometheus sends for pod and static
    # IP targets), ``localhost`` and the operator's ``http.allowed_hosts`` pass; any other
    # name, and a request naming none (HTTP/1.0), does not.
    """
    if host is None:
        return False
    if host == "localhost" or host in allowed:
        return True
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def metrics_app(metrics: Metrics, allowed_hosts: Callable[[], tuple[str, ...]] = tuple) -> web.Application:
    """The ``--metrics-listen`` application: ``GET /metrics`` and nothing else (404).

    ``allowed_hosts`` reads the live policy's ``http.allowed_hosts`` (a reload applies)."""
    app = web.Application(client_max_size=1024)

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            host = request_host(request)
        except GatewayError:
            return web.Response(status=400, text="bad Host header")
        if not scrape_host_allowed(host, allowed_hosts()):
            log.warning("metrics_host_refused", listener="metrics")
            metrics.metrics_denied.inc()
            return web.Response(status=421, text="this listener does not serve that host")
        if request.raw_path.split("?", 1)[0] != "/metrics":
            return web.Response(status=404, text="not found")
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, headers={"Allow": "GET"})
        return render(metrics)

    app.router.add_route("*", "/{tail:(?s:.*)}", handle)
    app.on_response_prepare.append(set_server_header)
    return app


async def start_metrics_site(metrics: Metrics, host: str, port: int,
                             allowed_hosts: Callable[[], tuple[str, ...]] = tuple) -> tuple[web.AppRunner, int]:
    """Start the metrics-only listener; returns its runner (to clean up) and bound port."""
    runner = web.AppRunner(metrics_app(metrics, allowed_hosts), access_log=None, keepalive_timeout=10.0,
                           shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    # aiohttp exposes the bound port (for port 0) only on the private server object.
    server = site._server
    sockets = getattr(server, "sockets", None) or ()
    bound = sockets[0].getsockname()[1] if sockets else port
    log.info("metrics_listener_started", host=host, port=bound)
    return runner, int(bound)
