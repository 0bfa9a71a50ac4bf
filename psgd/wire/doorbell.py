"""The doorbell: how a worker on the server's own machine hands over a gradient that lies
in shared memory. Both ends and the byte formats live here (docs/protocol.md, "The
shared-memory path", is the spec).

A worker connects to the server's Unix SOCK_SEQPACKET socket (its path comes in the
``welcome``) and sends one **handshake**: a msgpack map ``{"v", "worker_id", "nonce",
"grad"}`` and, in version 2, optionally ``"grad2"``: the names of the gradient segments it
created. Two segments let a worker compute into one while the server reads the other
(psgd.worker.core overlaps its steps with the pushes). The server answers with an ack.
From then on each **ring** is 16 bytes, ``<QII``: ``base_version, examples, flags``, meaning
"this gradient segment holds a new gradient": bit 0 of ``flags`` names the segment (0
``grad``, 1 ``grad2``), the other bits are 0. Each **ack** is 16 bytes, ``<QII``:
``version, staleness, word``, where the low 8 bits of ``word`` are a status and the high 24
bits the worker's data-shard generation. Anything else closes the connection.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from dataclasses import dataclass

import msgpack

from ..errors import ProtocolError, ShutdownRequested, TransportError
from . import shm
from .protocol import is_int

DOORBELL_VERSION = 2  # 2: an optional second gradient segment, named by bit 0 of a ring's flags
DOORBELL_VERSIONS = (1, 2)  # a server takes either
RING = struct.Struct("<QII")  # base_version, examples, flags
RING_SLOT = 1  # the flags bit that names the gradient segment
ACK = struct.Struct("<QII")  # version, staleness, status | data_generation << 8
ACK_OK, ACK_REFUSED, ACK_SHUTDOWN, ACK_REJOIN = 0, 1, 2, 3  # REJOIN: the server no longer knows you
ACK_STATUS_BITS = 8
ACK_STATUS_MASK = (1 << ACK_STATUS_BITS) - 1  # the rest of the word is the data-shard generation
HANDSHAKE_MAX = 4096  # bytes of the msgpack handshake a worker sends first
LISTEN_BACKLOG = 4096  # workers starting together connect at once (the kernel caps it at somaxconn)


def ack_word(status: int, data_generation: int) -> int:
    return status | (data_generation & 0xFFFFFF) << ACK_STATUS_BITS


# --- the server's end -------------------------------------------------------------------

@dataclass(frozen=True)
class Handshake:
    worker_id: int
    nonce: int
    grads: tuple[str, ...]  # the names of the worker's gradient segments (one or two)


@dataclass(frozen=True)
class Ring:
    base_version: int
    examples: int
    slot: int = 0  # which of the worker's gradient segments holds the gradient


class Malformed(Exception):
    """A doorbell message that fits no format: the server closes the connection."""


class LocalPeer:
    """One worker's doorbell connection, as the server holds it."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.worker_id: int | None = None  # known once the handshake is accepted
        self.grads: list[shm.Segment] = []

    def fileno(self) -> int:
        return self.conn.fileno()

    def receive(self) -> Handshake | Ring | None:
        """The next message: a Handshake first, Rings after; None when the worker hung up.
        Raises Malformed for anything else."""
        try:
            data = self.conn.recv(HANDSHAKE_MAX)
        except OSError:
            return None
        if not data:
            return None
        if self.worker_id is None:
            return _parse_handshake(data)
        if len(data) != RING.size:
            raise Malformed(f"a ring is {RING.size} bytes, got {len(data)}")
        base_version, examples, flags = RING.unpack(data)
        slot = flags & RING_SLOT
        if flags & ~RING_SLOT or slot >= len(self.grads):
            raise Malformed(f"ring flags {flags:#x} name no gradient segment of this worker's {len(self.grads)}")
        return Ring(base_version, examples, slot)

    def accept(self, worker_id: int, grad_names: tuple[str, ...], size: int, dtype) -> None:
        """Map the worker's gradient segments (and drop their names: they cannot leak now)."""
        for name in grad_names:
            segment = shm.Segment.attach(name, size, dtype)
            self.grads.append(segment)
            segment.unlink()
        self.worker_id = worker_id

    def send_ack(self, version: int, staleness: int, status: int, data_generation: int = 0) -> None:
        try:
            self.conn.send(ACK.pack(version, staleness, ack_word(status, data_generation)))
        except OSError:
            pass  # it is gone; the next poll sees the hang-up

    def close(self) -> None:
        for segment in self.grads:
            segment.close()
        self.grads = []
        self.conn.close()


def _parse_handshake(data: bytes) -> Handshake:
    try:
        hs = msgpack.unpackb(data, raw=False)
        version = hs.get("v")
        if not is_int(version) or version not in DOORBELL_VERSIONS:  # an integer: not 1.0, not true
            raise Malformed(f"doorbell version {version!r}, this end speaks {DOORBELL_VERSIONS}")
        worker_id, nonce, grads = hs["worker_id"], hs["nonce"], [hs["grad"]]
        if version >= 2 and hs.get("grad2") is not None:
            grads.append(hs["grad2"])
        if not (is_int(worker_id) and is_int(nonce) and all(isinstance(g, str) for g in grads)) or \
                len(set(grads)) != len(grads):
            raise Malformed("handshake fields of the wrong type")
        return Handshake(worker_id, nonce, tuple(grads))
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
        raise Malformed(f"handshake is not a msgpack map of v, worker_id, nonce, grad ({type(exc).__name__})") from None


class DoorbellListener:
    """The server's listening socket, in a private folder named after its pid (so a
    later server can reap what a SIGKILLed one left, see shm.reap_stale)."""

    def __init__(self):
        self.folder = shm.doorbell_dir()
        self.path = os.path.join(self.folder, "doorbell")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(self.path)
        self.sock.listen(LISTEN_BACKLOG)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> LocalPeer | None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        return LocalPeer(conn)

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
            os.rmdir(self.folder)
        except OSError:
            pass


# --- the worker's end -------------------------------------------------------------------

class DoorbellClient:
    """A worker's doorbell: handshake on connect, then ring and wait for the ack."""

    def __init__(self, path: str, worker_id: int, nonce: int, grad_names: list[str], timeout: float):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        handshake = {"v": DOORBELL_VERSION if len(grad_names) > 1 else 1, "worker_id": worker_id, "nonce": nonce,
                     "grad": grad_names[0]}
        if len(grad_names) > 1:
            handshake["grad2"] = grad_names[1]
        try:
            self.sock.connect(path)
            self.sock.send(msgpack.packb(handshake))
        except OSError as exc:
            self.sock.close()
            raise TransportError(f"shared-memory doorbell: {exc}") from None

    def ring(self, base_version: int, examples: int, slot: int = 0) -> None:
        try:
            self.sock.send(RING.pack(base_version, examples, slot))
        except OSError as exc:
            raise TransportError(f"server doorbell: {exc}") from None

    def wait_ack(self) -> tuple[int, int, int]:
        """``(version, staleness, data_generation)`` of an OK ack; raises what the status means."""
        try:
            data = self.sock.recv(64)
        except (OSError, socket.timeout) as exc:
            raise TransportError(f"server doorbell: {exc}") from None
        if len(data) != ACK.size:
            raise TransportError("the server closed the doorbell")
        version, staleness, word = ACK.unpack(data)
        status, generation = word & ACK_STATUS_MASK, word >> ACK_STATUS_BITS
        if status == ACK_SHUTDOWN:
            raise ShutdownRequested("the server ended the run")
        if status == ACK_REJOIN:
            raise TransportError("the server no longer knows this worker")
        if status == ACK_REFUSED:
            raise ProtocolError("refused", "the server refused the gradient")
        return version, staleness, generation

    def alive(self) -> bool:
        """False once the server's end is closed (it exited, or was killed)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return True  # nothing to read: the connection is open
        try:
            return self.sock.recv(1, socket.MSG_PEEK) != b""  # b"": the end of the stream
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()

