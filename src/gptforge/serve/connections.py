"""The connections of `gptforge serve`: uvicorn's h11 protocol with a read deadline and a connection cap.

uvicorn drops an idle kept-alive connection after `timeout_keep_alive`, but it never drops a connection that
is still sending its request: a client that connects and sends nothing (or a header a byte a minute) holds a
socket and a file descriptor for ever, and some thousands of them starve the process (issue 22, row 2).
`guarded_protocol(read_timeout, max_connections)` is the protocol class serve gives uvicorn:

- a request (its head and its body) must have arrived within `read_timeout` seconds of the connection being
  made, or of the first byte of the next request on a kept-alive connection; otherwise the connection is closed;
- past `max_connections` open connections, a new one is answered 503 and closed at once.

serve always speaks HTTP/1.1 through h11 this way, even where httptools is installed (uvicorn's faster
parser): the time per request is the model's. The engine steps on its own thread (serve/engine.py), so
nothing here can hold up generation.
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
         b"content-length: %d\r\n\r\n%s")
_BUSY_BODY = (b'{"error": {"message": "too many open connections (--max-connections); retry later", '
              b'"type": "server_error", "param": null, "code": "too_many_connections"}}')


def guarded_protocol(read_timeout: float, max_connections: int) -> type[H11Protocol]:
    class Guarded(H11Protocol):
        deadline = None  # the read deadline's timer, while a request is being received

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_BUSY % (len(_BUSY_BODY), _BUSY_BODY))
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):  # the request has not fully arrived yet
                self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self.deadline is None and not self.transport.is_closing():
                self.deadline = self.loop.call_later(read_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _too_slow(self) -> None:
            self.deadline = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                self.transport.close()

    return Guarded
