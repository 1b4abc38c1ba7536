"""The Python floor: a do-nothing aiohttp reverse proxy (one shared client session).

Whatever the gateway costs above this is the price of its features; below it nothing
written on aiohttp can go. Used by ``bench/harness.py``.

    .venv/bin/python bench/passthrough.py --listen 127.0.0.1:9000 --upstream http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse

from aiohttp import ClientSession, TCPConnector, web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def build(upstream: str) -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        # auto_decompress=False: the body goes back byte for byte with its Content-Encoding
        # (a decoded body under the upstream's `Content-Encoding: gzip` breaks the client).
        app["session"] = ClientSession(upstream, connector=TCPConnector(limit=0), auto_decompress=False)
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with app["session"].request(request.method, request.raw_path, data=body, headers=headers) as resp:
            payload = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=resp.status, body=payload, headers=out)

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:9000")
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    web.run_app(build(args.upstream), host=host, port=int(port), access_log=None, print=None)


if __name__ == "__main__":
    main()
