"""ZeroMQ sockets, timeouts and reconnects: the only module that imports zmq.

A client (worker, launcher, coordinator) talks to a server through a DEALER socket and a
strict request/reply discipline: each request carries a sequence number, the reply
echoes it, and replies to abandoned requests are dropped. A request that gets no reply
within ``REQUEST_TIMEOUT_S`` is sent again on a fresh socket, with growing pauses, until
``SERVER_WAIT_S`` has passed; then :class:`TransportError` says the server is gone.
"""

from __future__ import annotations

import time

import zmq

from .errors import ProtocolError, TransportError
from .protocol import MAX_HEADER_BYTES, Message, decode, encode

REQUEST_TIMEOUT_S = 5.0  # one try of a request
SERVER_WAIT_S = 60.0  # all tries of a request, before giving up on the server
RECONNECT_BACKOFF_S = (0.1, 2.0)  # first pause between tries, and the cap it doubles up to
LINGER_MS = 0  # an abandoned socket drops what it has not sent
POLL_INTERVAL_MS = 100  # how often a blocked loop looks at its stop flag


def max_message_bytes(n_params: int, itemsize: int) -> int:
    """The largest message a peer may send: one full parameter vector plus a header."""
    return n_params * itemsize + MAX_HEADER_BYTES + 4096


class Client:
    """Request/reply to one server over a DEALER socket, surviving server restarts."""

    def __init__(self, endpoint: str, name: str, context: zmq.Context | None = None,
                 request_timeout: float = REQUEST_TIMEOUT_S, server_wait: float = SERVER_WAIT_S):
        self.endpoint, self.name = endpoint, name
        self.context = context or zmq.Context.instance()
        self.request_timeout, self.server_wait = request_timeout, server_wait
        self.seq = 0
        self.bytes_sent = self.bytes_received = 0
        self.reconnects = 0
        self.socket = None
        self._connect()

    def _connect(self):
        if self.socket is not None:
            self.socket.close(linger=LINGER_MS)
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        # A DEALER's send blocks while it has no live peer (a killed server's connection can
        # leave it so for good): bound it, and treat a send that cannot go as a lost try.
        self.socket.setsockopt(zmq.SNDTIMEO, int(self.request_timeout * 1000))
        self.socket.connect(self.endpoint)

    def request(self, header: dict, arrays=(), offsets=None, copy: bool = False) -> Message:
        """Send one request and return the decoded reply (which may be an ``error``).

        With ``copy=False`` the arrays are sent without copying: leave them unchanged
        until this returns."""
        self.send(header, arrays, offsets, copy)
        return self.receive()

    def send(self, header: dict, arrays=(), offsets=None, copy: bool = False) -> None:
        """The first half of :meth:`request`: send now, and let :meth:`receive` wait (and
        retry). Several clients can so have one request each in flight at once."""
        self.seq += 1
        self._frames = encode({**header, "sender": self.name, "seq": self.seq}, arrays, offsets)
        self._size = sum(len(f) for f in self._frames)
        self._deadline = time.monotonic() + self.server_wait
        self._sent = self._try_send(copy)

    def receive(self) -> Message:
        """The reply to the request :meth:`send` sent, resending it on a fresh socket (with
        growing pauses) while none comes, until ``server_wait`` has passed."""
        pause = RECONNECT_BACKOFF_S[0]
        try:
            while True:
                if self._sent:
                    reply = self._await_reply(min(self.request_timeout, max(0.0, self._deadline - time.monotonic())))
                    if reply is not None:
                        return reply
                if time.monotonic() + pause >= self._deadline:
                    raise TransportError(f"no answer from {self.endpoint} for {self.server_wait:.0f} s; "
                                         "is the server running?")
                time.sleep(pause)
                pause = min(pause * 2, RECONNECT_BACKOFF_S[1])
                self.reconnects += 1
                self._connect()
                # A retry copies: the first try's zero-copy frames may still be held by the
                # socket that was just closed, and are not sent twice.
                self._sent = self._try_send(copy=True)
        finally:
            self._frames = None

    def _try_send(self, copy: bool) -> bool:
        try:
            self.socket.send_multipart(self._frames, copy=copy)
        except zmq.Again:
            return False  # no peer took it within the send timeout: a lost try
        self.bytes_sent += self._size
        return True

    def _await_reply(self, timeout: float) -> Message | None:
        end = time.monotonic() + timeout
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0 or not self.socket.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                return None
            frames = self.socket.recv_multipart(copy=False)
            self.bytes_received += sum(len(f.buffer) for f in frames)
            try:
                msg = decode(frames)
            except ProtocolError:
                continue  # garbage from a confused peer: keep waiting for our reply
            if msg.get("seq") == self.seq:
                return msg  # anything else answers a request we gave up on

    def close(self):
        if self.socket is not None:
            self.socket.close(linger=LINGER_MS)
            self.socket = None


class ServerSocket:
    """The server's ROUTER socket: receive ``(identity, frames)``, send replies."""

    def __init__(self, bind: str, max_message: int, context: zmq.Context | None = None):
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message)  # larger frames drop the connection
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        try:
            if bind.endswith(":0"):
                port = self.socket.bind_to_random_port(bind[: bind.rindex(":")])
                bind = f"{bind[: bind.rindex(':')]}:{port}"
            else:
                self.socket.bind(bind)
        except zmq.ZMQError as exc:
            self.socket.close()
            raise TransportError(f"cannot bind {bind}: {exc}") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self):
        """``(identity, frames)`` of the next message; frames are zero-copy zmq Frames."""
        frames = self.socket.recv_multipart(copy=False)
        return frames[0], frames[1:]

    def send(self, identity, frames: list, copy: bool = True) -> None:
        self.socket.send_multipart([identity, *frames], copy=copy)

    def close(self):
        self.socket.close(linger=LINGER_MS)


class Poller:
    """Waits on zmq sockets and plain file descriptors (the shared-memory doorbells) alike."""

    def __init__(self):
        self._poller = zmq.Poller()

    def register(self, sock_or_fd) -> None:
        self._poller.register(sock_or_fd, zmq.POLLIN)

    def unregister(self, sock_or_fd) -> None:
        self._poller.unregister(sock_or_fd)

    def poll(self, timeout_ms: int) -> list:
        return [s for s, _ in self._poller.poll(timeout_ms)]
