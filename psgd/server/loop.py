"""``psgd server``: a thin loop around :class:`ServerState` that moves bytes and time.

It answers ZeroMQ requests on one ROUTER socket and, for workers on the same machine,
doorbells (psgd.wire.doorbell) whose gradients lie in shared memory. Both paths hand a
push to ``ServerState.push`` and turn its decision into a reply. The run's phase
(psgd.server.phase) decides when the loop ends: a ``shutdown`` message, ``max_updates``
or a deadline, or SIGINT/SIGTERM: the first signal finishes the current message, tells
workers to stop and exits; a second exits at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint
from ..config import TrainConfig
from ..errors import ConfigError, ProtocolError, TransportError
from ..files import atomic_write
from ..model.layout import shard_range
from ..model.interface import build_model
from ..wire import doorbell, shm
from ..wire.protocol import SERVER_TAKES, decode, encode
from ..wire.transport import POLL_INTERVAL_MS, Poller, ServerKeys, ServerSocket, max_message_bytes
from .exposure import resolve_bind
from .phase import Phase
from .pushtimes import PushTimes
from .state import APPLIED, HELD, REFUSED, SHUTDOWN, ServerState

log = logging.getLogger(__name__)

_DOORBELL_STATUS = {SHUTDOWN: doorbell.ACK_SHUTDOWN}
PUBLISH_EVERY_S = 1.0  # how often Server.publish sees the state


@dataclass(frozen=True)
class ServerOptions:
    bind: str | None = None  # None: all interfaces with CURVE keys, else loopback (psgd.server.exposure)
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
    insecure: bool = False  # allow a non-loopback bind without CURVE (the caller warns)
    wait_for_workers: int = 0  # ssp/sync: hold every ack until this many workers said hello
    timing_trace: str | None = None  # a folder: write when each push was applied to FOLDER/server[-K].npz at the end


class Server:
    def __init__(self, config: TrainConfig, options: ServerOptions):
        self.options = options
        bind, _ = resolve_bind(options.bind, options.keys is not None, options.insecure)  # first: nothing to undo
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
                                 max_updates=options.max_updates, wait_for_workers=options.wait_for_workers)
        if options.timing_trace:
            self.state.push_times = PushTimes()
        self._last_checkpoint = (time.monotonic(), 0)  # version 0 is the seed: nothing to keep
        if options.resume:
            self._resume()
        self.sock = ServerSocket(bind, max_message_bytes(hi - lo, net.dtype.itemsize), keys=options.keys)
        self.poller = Poller()
        self.poller.register(self.sock.socket)
        self.listener = None
        self.local: dict[int, doorbell.LocalPeer] = {}  # by file descriptor
        self.local_by_worker: dict[int, doorbell.LocalPeer] = {}
        if self.weights_seg is not None:
            self.listener = doorbell.DoorbellListener()
            self.poller.register(self.listener.fileno())
        self.pending: dict[int, tuple] = {}  # worker -> (identity, seq, want_params) of a held zmq push
        self._held: list = []  # zmq requests from workers that arrived while paused
        self._held_fds: list[int] = []  # doorbells not polled while paused
        self._signals = 0
        self._drain_told = False
        # publish(state), if set, is called from this loop about once a second (psgd server
        # --metrics reads the state here, in the loop's thread, never from its own)
        self.publish = None
        self._published = 0.0

    def _resume(self):
        if not self.options.checkpoint_dir:
            raise ConfigError("--resume needs --checkpoint-dir")
        found = checkpoint.newest_valid(Path(self.options.checkpoint_dir), say=log.warning)
        if found is None:
            log.warning(f"no valid checkpoint in {self.options.checkpoint_dir}; starting afresh")
            return
        arrays, meta, path = found
        self.state.restore(arrays, meta)
        self._last_checkpoint = (time.monotonic(), self.state.store.version)
        self.state.checkpoint_status["version"] = self.state.store.version
        log.info(f"resumed from {path} at version {self.state.store.version}")

    def _maybe_checkpoint(self, force: bool = False):
        if not self.options.checkpoint_dir:
            return
        when, version = self._last_checkpoint
        every_u = self.options.checkpoint_every_updates
        due = force or time.monotonic() - when >= self.options.checkpoint_every_s or \
            (every_u is not None and self.state.store.version - version >= every_u)
        if self.state.store.version == version or not due:
            return
        arrays, meta = self.state.checkpoint()
        folder, now_version, status = Path(self.options.checkpoint_dir), self.state.store.version, self.state.checkpoint_status
        try:
            checkpoint.write(folder, now_version, arrays, meta)
        except OSError as exc:  # a full disk: keep the last good one, train on, try again next interval
            if status["error"] is None:  # said once per streak of failures
                kept = f"version {status['version']}" if status["version"] is not None else "none yet"
                log.error(f"cannot write the checkpoint at version {now_version} to {folder}: "
                          f"{exc.strerror or exc}; the newest good checkpoint ({kept}) stays; training goes on, "
                          f"trying again every {self.options.checkpoint_every_s:g} s")
            status.update(failures=status["failures"] + 1, error=str(exc.strerror or exc), failed_version=now_version)
            checkpoint.prune(folder, 1)  # older ones only take room the next try needs
            self._last_checkpoint = (time.monotonic(), version)
            return
        log.debug(f"checkpoint at version {now_version} written to {folder}")
        if status["error"] is not None:
            log.info(f"checkpoints are written again (version {now_version})")
        status.update(version=now_version, error=None)
        self._last_checkpoint = (time.monotonic(), now_version)

    @property
    def endpoint(self) -> str:
        return self.sock.endpoint

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> dict:
        """Serve until the run's phase is STOPPED; return the final statistics."""
        self._install_signals()
        if self.options.ready_file:
            atomic_write(Path(self.options.ready_file), json.dumps({"endpoint": self.endpoint, "pid": os.getpid()}))
        start = time.monotonic()
        try:
            while not self._finished(start):
                self.state.tick()  # leases run out even when nothing arrives
                self._deliver()
                self._maybe_checkpoint()
                if self.publish is not None and time.monotonic() - self._published >= PUBLISH_EVERY_S:
                    self._published = time.monotonic()
                    self.publish(self.state)
                for ready in self.poller.poll(POLL_INTERVAL_MS):
                    if ready is self.sock.socket:
                        self._serve_zmq()
                    elif self.listener is not None and ready == self.listener.fileno():
                        self._accept_local()
                    else:
                        self._serve_local(ready)
            self._maybe_checkpoint(force=True)  # a clean stop keeps everything
            return self.state.stats()
        finally:
            self.close()
            self._save_push_times()

    def _save_push_times(self) -> None:
        times, o = self.state.push_times, self.options
        if times is None:
            return
        path = Path(o.timing_trace) / ("server.npz" if o.num_shards == 1 else f"server-{o.shard}.npz")
        try:
            times.save(path)
        except OSError as exc:  # the run is what matters: a full disk costs the trace only
            log.warning(f"cannot write the push times {path}: {exc.strerror or exc}")

    def _finished(self, start) -> bool:
        o, s = self.options, self.state
        if o.deadline_s is not None and time.monotonic() - start >= o.deadline_s:
            s.stop("budget")  # (max_updates is the state's: it stops at the very update)
        if not s.phase.stopping:
            if not s.phase.paused and (self._held or self._held_fds):
                self._release_held()  # resumed: answer what the pause held
            return False
        if not self._drain_told:  # the run just ended: everyone waiting hears it now
            self._drain_told = True
            self._release_held()
            for lw in self.local_by_worker.values():
                lw.send_ack(s.store.version, 0, doorbell.ACK_SHUTDOWN)
            for identity, seq, _ in self.pending.values():
                self._send(identity, {"type": "shutdown"}, [], seq)
            self.pending.clear()
        return s.phase.settle(s.members.any_connected()) is Phase.STOPPED

    # --- the ZeroMQ path ----------------------------------------------------------------

    def _serve_zmq(self):
        identity, frames = self.sock.recv()
        self.state.bytes_in += sum(len(f.buffer) for f in frames)
        try:
            msg = decode(frames, accept=SERVER_TAKES)
        except ProtocolError as exc:
            header, arrays = self.state.refuse(exc)
            self._send(identity, header, arrays, exc.seq or 0)  # a readable header's seq: the client can match it
            return
        role = self.sock.role(frames)  # the key's, stamped by the authenticator: not the sender's claim
        if self.state.phase.paused and _from_worker(msg):
            self._held.append((identity, msg, role))  # answered on resume
            return
        self._reply(identity, msg, role)

    def _release_held(self):
        held, self._held = self._held, []
        for identity, msg, role in held:
            self._reply(identity, msg, role)
        for fd in self._held_fds:
            self.poller.register(fd)
        self._held_fds = []

    def _reply(self, identity, msg, role):
        result = self.state.handle(msg, role)
        if result is None:  # a push the consistency model holds: answered by _deliver
            self.pending[msg["worker_id"]] = (identity, msg["seq"], msg.get("want_params") is True)
        else:
            header, arrays = result
            if header["type"] == "welcome":
                log.info(f"worker {header['worker_id']} ({msg['worker']}) joined, data shards {header['data_shards']}")
                if self.weights_seg is not None and msg["transport"] != "zmq" and not self.state.config.wire_only:
                    header["local"] = {"weights": self.weights_seg.name, "doorbell": self.listener.path,
                                       "nonce": int(self.weights_seg.header[shm.NONCE])}
            elif header["type"] == "error" and header["code"] == "forbidden":
                log.warning(f"refused a {msg.type} from {msg.get('sender')!r}: {header['code']}: {header['message']}")
            elif header["type"] == "error":
                log.debug(f"refused a {msg.type} from {msg.get('sender')!r}: {header['code']}: {header['message']}")
            elif msg.type in ("pause", "resume", "set_lr", "set_params", "shutdown", "bye"):
                log.debug(f"{msg.type} from {msg.get('sender')!r}" + (f": lr {msg['lr']:.4g}" if msg.type == "set_lr" else ""))
            self._send(identity, header, arrays, msg["seq"])
        self._deliver()  # this message may have released other workers

    def _deliver(self):
        """Send every ack that a held push is now owed, by the path its worker came."""
        for ack in self.state.take_released():
            worker_id, version, staleness = ack
            lw = self.local_by_worker.get(worker_id)
            if lw is not None:
                self._ack_local(lw, version, staleness, doorbell.ACK_OK)
            elif worker_id in self.pending:
                identity, seq, want_params = self.pending.pop(worker_id)
                header, arrays = self.state.ack_reply(ack, want_params)
                self._send(identity, header, arrays, seq)

    def _send(self, identity, header, arrays, seq):
        # every array a server sends is its range of the weights
        reply = encode({**header, "seq": seq, "sender": "server"}, arrays, [self.state.store.lo] * len(arrays))
        self.state.bytes_out += sum(len(f) for f in reply)
        self.sock.send(identity, reply, copy=True)  # copy: the weights change after this returns

    # --- the shared-memory path -----------------------------------------------------------

    def _accept_local(self):
        peer = self.listener.accept()
        if peer is not None:
            self.local[peer.fileno()] = peer
            self.poller.register(peer.fileno())

    def _serve_local(self, fd: int):
        lw = self.local.get(fd)
        if lw is None:
            return
        if self.state.phase.paused and lw.worker_id is not None:
            self.poller.unregister(fd)  # its doorbell waits, unread, until resume
            self._held_fds.append(fd)
            return
        try:
            message = lw.receive()
        except doorbell.Malformed:
            self.state.errors["bad_doorbell"] += 1
            self._drop_local(fd)
            return
        if message is None:
            self._drop_local(fd)  # the worker went away (exited, or was killed)
        elif isinstance(message, doorbell.Handshake):
            self._handshake(fd, lw, message)
        else:
            decision = self.state.push(lw.worker_id, message.base_version, message.examples, lw.grads[message.slot].array)
            if decision.outcome == APPLIED:
                self._ack_local(lw, decision.version, decision.staleness, doorbell.ACK_OK)
            elif decision.outcome == REFUSED:
                status = doorbell.ACK_REJOIN if decision.code == "unknown_worker" else doorbell.ACK_REFUSED
                self._ack_local(lw, decision.version, 0, status)
            elif decision.outcome != HELD:
                self._ack_local(lw, self.state.store.version, 0, _DOORBELL_STATUS[decision.outcome])
            self._deliver()

    def _handshake(self, fd, lw: doorbell.LocalPeer, hs: doorbell.Handshake):
        """First message: who the worker is and where its gradient lies."""
        state = self.state
        if hs.nonce != int(self.weights_seg.header[shm.NONCE]) or hs.worker_id not in state.members.workers:
            state.errors["bad_handshake"] += 1
            self._drop_local(fd)
            return
        try:
            lw.accept(hs.worker_id, hs.grads, state.store.size, state.store.dtype)
        except TransportError:
            state.errors["bad_handshake"] += 1
            self._drop_local(fd)
            return
        self.local_by_worker[hs.worker_id] = lw
        state.members.workers[hs.worker_id].transport = "shm"
        log.debug(f"worker {hs.worker_id} pushes through shared memory")
        self._ack_local(lw, state.store.version, 0, doorbell.ACK_OK)

    def _ack_local(self, lw, version, staleness, status):
        record = self.state.members.workers.get(lw.worker_id)
        lw.send_ack(version, staleness, status, record.data_generation if record is not None else 0)

    def _drop_local(self, fd):
        lw = self.local.pop(fd, None)
        if lw is None:
            return
        if fd in self._held_fds:
            self._held_fds.remove(fd)
        else:
            self.poller.unregister(fd)
        if lw.worker_id is not None:
            log.debug(f"worker {lw.worker_id} closed its doorbell")
            self.local_by_worker.pop(lw.worker_id, None)
            self.state.disconnect(lw.worker_id)
            self._deliver()
        lw.close()

    # --- signals and teardown -------------------------------------------------------------

    def _install_signals(self):
        def handler(signum, frame):
            if signum == signal.SIGHUP and self._signals:
                return  # the launcher's parent-death signal comes once per thread of it: one stop
            self._signals += 1
            log.warning(f"{signal.Signals(signum).name}" + (", exiting now" if self._signals > 1 else
                        ", stopping after the current message"))
            if self._signals > 1:
                self.close()  # still release the shared memory; a stuck peer cannot delay this
                os._exit(128 + signum)  # second signal: now
            self.state.stop("interrupt" if signum == signal.SIGINT else "signal")

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                signal.signal(sig, handler)
            except ValueError:
                pass  # not the main thread (a test running the server in a thread)

    def close(self):
        for fd in list(self.local):
            self._drop_local(fd)
        self.sock.close()
        self.poller.close()
        if self.listener is not None:
            self.listener.close()
        if self.weights_seg is not None:
            self.weights_seg.unlink()


def _from_worker(msg) -> bool:
    """Training traffic, held while paused; a monitor's pulls and stats go through."""
    return msg.type in ("push", "hello") or (msg.type == "pull" and msg.get("worker_id") is not None)
