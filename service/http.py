"""uvicorn's httptools protocol with a deadline on request headers.

uvicorn times out idle keep-alive connections but not a client that opens a connection and sends
its request line and headers slowly or never finishes them: each such connection is held until
the client goes. `HeaderTimeoutProtocol` answers `408` and closes the connection when the headers
of a request have not all arrived `header_timeout_s` after the connection opened or the request
began. Bodies have their own deadline (`BODY_TIMEOUT_S`, in `service.bodies`). `make serve` runs
uvicorn with `--http service.http:HeaderTimeoutProtocol`; `create_app` sets the deadline from
`HEADER_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Optional

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_TIMEOUT_BODY = json.dumps(
    {
        "error": {
            "message": "the request's headers did not arrive in time",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    }
).encode()
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0

    _header_timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()
