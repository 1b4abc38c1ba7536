"""A FaultProxy that cuts an HTTP/2 (gRPC) connection in the middle of a response.

``cut_next_response()`` arms it: the next server-to-client DATA frame on a request stream
is forwarded only half, then both TCP connections are aborted. The client has already
received the response HEADERS (status 200, gRPC content type) and part of the message:
the upstream "closed the stream mid-response". The proxy then disarms itself, so the
client's next connection is relayed normally.

It parses HTTP/2 frame headers (9 bytes: 24-bit length, type, flags, 31-bit stream id) on
the server-to-client direction only; a server's connection preface is a plain SETTINGS
frame, so framing starts at the first byte.
"""

from __future__ import annotations

import asyncio

from tests.support.fault_proxy import FaultProxy, _Link

_DATA = 0x0
_HEADER = 9


class H2CutProxy(FaultProxy):
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        super().__init__(target_host, target_port, host=host)
        self.armed = False
        self.cuts = 0

    def cut_next_response(self) -> None:
        def arm() -> None:
            self.armed = True

        self._run_sync(arm)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link, *,
                    to_client: bool) -> None:
        if not to_client:
            await super()._pump(src, dst, link, to_client=to_client)
            return
        try:
            while True:
                try:
                    header = await src.readexactly(_HEADER)
                except asyncio.IncompleteReadError:
                    break
                length = int.from_bytes(header[:3], "big")
                frame_type = header[3]
                stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
                payload = await src.readexactly(length)
                if self.armed and frame_type == _DATA and stream != 0 and length > 1:
                    self.armed = False
                    self.cuts += 1
                    dst.write(header + payload[: length // 2])
                    await dst.drain()
                    break
                dst.write(header + payload)
                await dst.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            link.abort(rst=False)
            self._links.discard(link)
