"""``psgd server``: a thin loop around :class:`ServerState`.

It answers ZeroMQ requests on one ROUTER socket and, for workers on the same machine,
doorbells on a Unix socket whose gradients lie in shared memory (see psgd.shm). Both
paths end in ``ServerState.apply``. The loop stops on a ``shutdown`` message, on
``max_updates`` or a deadline, or on SIGINT/SIGTERM: the first signal finishes the
current message, tells workers to stop and exits; a second exits at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack

from . import checkpoint
from ..wire import shm
from ..config import TrainConfig
from ..files import atomic_write
from ..errors import ConfigError, ProtocolError, TransportError
from ..model.layout import shard_range
from ..model.interface import build_model
from ..wire.protocol import decode, encode
from .state import ServerState
from ..wire.transport import POLL_INTERVAL_MS, Poller, ServerKeys, ServerSocket, max_message_bytes

SHUTDOWN_GRACE_S = 3.0  # after stopping, how long to keep telling late workers to stop
COORDINATOR_GRACE_S = 30.0  # after its own budget ran out, how long to wait for a coordinator's shutdown


@dataclass(frozen=True)
class ServerOptions:
    bind: str = "tcp://*:5555"
    data_shards: int = 1  # data shards handed to workers (usually the number of workers)
    shared_memory: bool = True  # offer the fast path to workers on this machine
    ready_file: str | None = None  # written (atomically) with the endpoint once listening
    max_updates: int | None = None
    deadline_s: float | None = None
    checkpoint_dir: str | None = None  # where checkpoints go; None: none are written
    checkpoint_every_s: float = 10.0  # and on a clean stop
    resume: bool = False  # start from the newest valid checkpoint in checkpoint_dir
    shard: int = 0  # this server holds range `shard` of `num_shards` of the parameter vector
    num_shards: int = 1
    keys: ServerKeys | None = None  # CURVE: encrypt, and accept only the allowed clients' keys
    checkpoint_every_updates: int | None = None  # also checkpoint after this many updates


class _LocalWorker:
    """One shared-memory worker: its Unix socket and its gradient segment."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.worker_id: int | None = None
        self.grad: shm.Segment | None = None


class Server:
    def __init__(self, config: TrainConfig, options: ServerOptions):
        self.options = options
        self.weights_seg = None
        writer = None
        params = None
        net = build_model(config.model)
        lo, hi = shard_range(net.n_params, options.shard, options.num_shards)
        if options.shared_memory and shm.available():
            shm.reap_stale()
            self.weights_seg = shm.Segment.create("psgd-weights", hi - lo, net.dtype)
            params = self.weights_seg.array
            writer = shm.SeqlockWriter(self.weights_seg)
        self.state = ServerState(config, options.data_shards, params, writer,
                                 shard=options.shard, num_server_shards=options.num_shards,
                                 max_updates=options.max_updates)
        self._last_checkpoint = (time.monotonic(), 0)  # version 0 is the seed: nothing to keep
        if options.resume:
            self._resume()
        self.sock = ServerSocket(options.bind, max_message_bytes(hi - lo, net.dtype.itemsize), keys=options.keys)
        self.poller = Poller()
        self.poller.register(self.sock.socket)
        self.local: dict[int, _LocalWorker] = {}
        self.doorbell_path = None
        self._listener = None
        if self.weights_seg is not None:
            self._tmpdir = shm.doorbell_dir()
            self.doorbell_path = os.path.join(self._tmpdir, "doorbell")
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self._listener.bind(self.doorbell_path)
            self._listener.listen(64)
            self._listener.setblocking(False)
            self.poller.register(self._listener.fileno())
        self.local_by_worker: dict[int, _LocalWorker] = {}
        self.pending: dict[int, tuple] = {}  # worker -> (identity, seq, want_params) of a held push
        self._held: list = []  # worker requests that arrived while paused
        self._held_fds: list[int] = []  # doorbells not polled while paused
        self._signals = 0
        self._stop_since = None

    def _resume(self):
        if not self.options.checkpoint_dir:
            raise ConfigError("--resume needs --checkpoint-dir")
        found = checkpoint.newest_valid(Path(self.options.checkpoint_dir), say=_say)
        if found is None:
            _say(f"psgd server: no valid checkpoint in {self.options.checkpoint_dir}; starting afresh")
            return
        arrays, meta, path = found
        self.state.restore(arrays, meta)
        self._last_checkpoint = (time.monotonic(), self.state.version)
        _say(f"psgd server: resumed from {path} at version {self.state.version}")

    def _maybe_checkpoint(self, force: bool = False):
        if not self.options.checkpoint_dir:
            return
        when, version = self._last_checkpoint
        every_u = self.options.checkpoint_every_updates
        due = force or time.monotonic() - when >= self.options.checkpoint_every_s or \
            (every_u is not None and self.state.version - version >= every_u)
        if self.state.version == version or not due:
            return
        arrays, meta = self.state.checkpoint()
        checkpoint.write(Path(self.options.checkpoint_dir), self.state.version, arrays, meta)
        self._last_checkpoint = (time.monotonic(), self.state.version)

    @property
    def endpoint(self) -> str:
        return self.sock.endpoint

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> dict:
        """Serve until told to stop; return the final statistics."""
        self._install_signals()
        if self.options.ready_file:
            atomic_write(Path(self.options.ready_file), json.dumps({"endpoint": self.endpoint, "pid": os.getpid()}))
        start = time.monotonic()
        try:
            while not self._finished(start):
                self.state.tick()  # leases run out even when nothing arrives
                self._deliver()
                self._maybe_checkpoint()
                for ready in self.poller.poll(POLL_INTERVAL_MS):
                    if ready is self.sock.socket:
                        self._serve_zmq()
                    elif self._listener is not None and ready == self._listener.fileno():
                        self._accept_local()
                    else:
                        self._serve_local(ready)
            self._maybe_checkpoint(force=True)  # a clean stop keeps everything
            return self.state.stats()
        finally:
            self.close()

    def _finished(self, start) -> bool:
        o, s = self.options, self.state
        if o.deadline_s is not None and time.monotonic() - start >= o.deadline_s:
            s.stopping = s.budget_spent = True  # (max_updates is the state's: it stops at the very update)
        if not s.stopping:
            return False
        if self._stop_since is None:
            self._stop_since = time.monotonic()
            s.paused = False
            self._release_held()
            self._tell_local_workers_to_stop()
            for identity, seq, _ in self.pending.values():
                self._send(identity, {"type": "shutdown"}, [], seq)
            self.pending.clear()
        waited = time.monotonic() - self._stop_since
        if any(r.connected for r in s.workers.values()) and waited < SHUTDOWN_GRACE_S:
            return False
        # A run that ran out of the server's own budget under a coordinator's watch: give the
        # coordinator time to evaluate the final weights and say shutdown itself. (A signal
        # means stop now: a SIGKILLed launcher's children get SIGTERM and must not linger.)
        return not (s.budget_spent and s.coordinated and not s.shutdown_requested and waited < COORDINATOR_GRACE_S)

    def _serve_zmq(self):
        identity, frames = self.sock.recv()
        self.state.bytes_in += sum(len(f.buffer) for f in frames)
        try:
            msg = decode(frames)
        except ProtocolError as exc:
            header, arrays = self.state.refuse(exc)
            seq = 0
        else:
            if self.state.paused and _from_worker(msg):
                self._held.append((identity, msg))  # answered on resume
                return
            self._reply(identity, msg)
            if not self.state.paused:
                self._release_held()
            return
        self._send(identity, header, arrays, seq)

    def _release_held(self):
        held, self._held = self._held, []
        for identity, msg in held:
            self._reply(identity, msg)
        for fd in self._held_fds:
            self.poller.register(fd)
        self._held_fds = []

    def _reply(self, identity, msg):
        result = self.state.handle(msg)
        if result is None:  # a push the consistency model holds: answered by _deliver
            self.pending[msg["worker_id"]] = (identity, msg["seq"], msg.get("want_params") is True)
            self._deliver()
            return
        header, arrays = result
        if header["type"] == "welcome" and self.weights_seg is not None and msg["transport"] != "zmq":
            header["local"] = {"weights": self.weights_seg.name, "doorbell": self.doorbell_path,
                               "nonce": int(self.weights_seg.header[shm.NONCE])}
        self._send(identity, header, arrays, msg["seq"])
        self._deliver()  # this push may have released other workers

    def _deliver(self):
        """Send every ready ack to its worker, by the path it came."""
        outbox = self.state.outbox
        while outbox:
            ack = outbox.pop(0)
            worker_id, version, staleness = ack
            lw = self.local_by_worker.get(worker_id)
            if lw is not None:
                self._ack(lw, version, staleness, shm.ACK_OK)
            elif worker_id in self.pending:
                identity, seq, want_params = self.pending.pop(worker_id)
                header, arrays = self.state.ack_reply(ack, want_params)
                self._send(identity, header, arrays, seq)

    def _send(self, identity, header, arrays, seq):
        # every array a server sends is its range of the weights
        reply = encode({**header, "seq": seq, "sender": "server"}, arrays, [self.state.lo] * len(arrays))
        self.state.bytes_out += sum(len(f) for f in reply)
        self.sock.send(identity, reply, copy=True)  # copy: the weights change after this returns

    # --- the shared-memory path -----------------------------------------------------------

    def _accept_local(self):
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.local[conn.fileno()] = _LocalWorker(conn)
        self.poller.register(conn.fileno())

    def _serve_local(self, fd: int):
        lw = self.local.get(fd)
        if lw is None:
            return
        if self.state.paused and lw.worker_id is not None:
            self.poller.unregister(fd)  # its doorbell waits, unread, until resume
            self._held_fds.append(fd)
            return
        try:
            data = lw.conn.recv(shm.HANDSHAKE_MAX)
        except OSError:
            data = b""
        if not data:
            self._drop_local(fd)  # the worker went away (exited, or was killed)
            return
        if lw.worker_id is None:
            self._handshake(fd, lw, data)
            return
        if len(data) != shm.DOORBELL.size:
            self.state.errors["bad_frames"] += 1
            self._drop_local(fd)
            return
        base_version, examples, _flags = shm.DOORBELL.unpack(data)
        if self.state.stopping:
            self._ack(lw, 0, 0, shm.ACK_SHUTDOWN)
            return
        try:
            self.state.submit(lw.worker_id, base_version, examples, lw.grad.array)
        except ProtocolError as exc:
            self.state.refuse(exc)
            status = shm.ACK_REJOIN if exc.code == "unknown_worker" else shm.ACK_REFUSED
            self._ack(lw, self.state.version, 0, status)
            return
        self._deliver()

    def _handshake(self, fd, lw: _LocalWorker, data: bytes):
        """First message: msgpack {worker_id, nonce, grad}: who it is and where its gradient lies."""
        try:
            hs = msgpack.unpackb(data, raw=False)
            worker_id, nonce, grad_name = int(hs["worker_id"]), int(hs["nonce"]), str(hs["grad"])
            if nonce != int(self.weights_seg.header[shm.NONCE]) or worker_id not in self.state.workers:
                raise ValueError("wrong nonce or unknown worker")
            lw.grad = shm.Segment.attach(grad_name, self.state.size, self.state.dtype)
            lw.grad.unlink()  # mapped now: the name is no longer needed, and cannot leak
        except (ValueError, KeyError, TypeError, TransportError, msgpack.UnpackException):
            self.state.errors["bad_handshake"] += 1
            self._drop_local(fd)
            return
        lw.worker_id = worker_id
        self.local_by_worker[worker_id] = lw
        record = self.state.workers[worker_id]
        record.transport = "shm"
        self._ack(lw, self.state.version, 0, shm.ACK_OK)

    def _ack(self, lw, version, staleness, status):
        record = self.state.workers.get(lw.worker_id)
        if record is not None:
            status |= (record.data_generation & 0xFFFFFF) << 8
        try:
            lw.conn.send(shm.ACK.pack(version, staleness, status))
        except OSError:
            pass  # it is gone; the next poll sees the hang-up

    def _drop_local(self, fd):
        lw = self.local.pop(fd, None)
        if lw is None:
            return
        if fd in self._held_fds:
            self._held_fds.remove(fd)
        else:
            self.poller.unregister(fd)
        if lw.worker_id is not None:
            self.local_by_worker.pop(lw.worker_id, None)
            self.state.disconnect(lw.worker_id)
            self._deliver()
        if lw.grad is not None:
            lw.grad.close()
        lw.conn.close()

    def _tell_local_workers_to_stop(self):
        for lw in self.local.values():
            if lw.worker_id is not None:
                self._ack(lw, self.state.version, 0, shm.ACK_SHUTDOWN)

    # --- signals and teardown -------------------------------------------------------------

    def _install_signals(self):
        def handler(signum, frame):
            self._signals += 1
            print(f"psgd server: {signal.Signals(signum).name}" + (", exiting now" if self._signals > 1 else
                  ", stopping after the current message"), file=sys.stderr, flush=True)
            if self._signals > 1:
                self.close()  # still release the shared memory; a stuck peer cannot delay this
                os._exit(128 + signum)  # second signal: now
            self.state.stopping = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, handler)
            except ValueError:
                pass  # not the main thread (a test running the server in a thread)

    def close(self):
        for fd in list(self.local):
            self._drop_local(fd)
        self.sock.close()
        if self._listener is not None:
            self._listener.close()
            try:
                os.unlink(self.doorbell_path)
                os.rmdir(self._tmpdir)
            except OSError:
                pass
        if self.weights_seg is not None:
            self.weights_seg.unlink()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _from_worker(msg) -> bool:
    """Training traffic, held while paused; a monitor's pulls and stats go through."""
    return msg.type in ("push", "hello") or (msg.type == "pull" and msg.get("worker_id") is not None)
