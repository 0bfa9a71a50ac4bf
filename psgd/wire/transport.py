"""ZeroMQ sockets, timeouts and reconnects: the only module that imports zmq.

A client (worker, launcher, coordinator) talks to a server through a DEALER socket and a
strict request/reply discipline: each request carries a sequence number, the reply
echoes it, and replies to abandoned requests are dropped. A request that gets no reply
within ``REQUEST_TIMEOUT_S`` is sent again on a fresh socket, with growing pauses, until
``SERVER_WAIT_S`` has passed; then :class:`TransportError` says the server is gone.

With CURVE keys (``psgd keygen``) traffic is encrypted and the server accepts only the
clients whose public keys lie in its allowed folder: a ZAP handler (pyzmq's
authenticator thread) checks each connection before any message of it is delivered, so
an unknown or plaintext client gets nothing and changes nothing. Each allowed key has a
role (psgd.wire.protocol: WORKER, CONTROL): keys in the allowed folder itself are
workers', keys in its ``control/`` subfolder may also steer the run. The handler stamps
the role on every message of the connection (its ZAP User-Id), and the server reads it
from there: a client cannot claim a role its key does not have.

A secret key file that others may read is refused, as ssh refuses one: whoever can read
it can be that party.
"""

from __future__ import annotations

import os
import select
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ..errors import ConfigError, Interrupted, ProtocolError, TransportError
from .protocol import CONTROL, MAX_HEADER_BYTES, MAX_REPLY_HEADER_BYTES, WORKER, Message, decode, encode

REQUEST_TIMEOUT_S = 5.0  # one try of a request
# A reply of many megabytes (the weights of a large model) takes time to copy, send and
# receive on a loaded host: a try and the whole wait get a second for every this many
# bytes a client may receive beyond UNSIZED_WEIGHTS_BYTES. Without it a coordinator gave up
# on a 100M-parameter server (107 MB a shard's pull) after 10 s under load, each retry
# having made the server copy its range again.
SLOW_TRANSFER_BYTES_PER_S = 20e6
SERVER_WAIT_S = 60.0  # all tries of a request, before giving up on the server
RECONNECT_BACKOFF_S = (0.1, 2.0)  # first pause between tries, and the cap it doubles up to
LINGER_MS = 0  # an abandoned socket drops what it has not sent
POLL_INTERVAL_MS = 100  # how often a blocked loop looks at its stop flag
CONTROL_KEYS_DIR = "control"  # the allowed folder's subfolder of control keys


@dataclass(frozen=True)
class ClientKeys:
    """CURVE for a client: its own key pair and the public key of the server it trusts."""

    public: bytes
    secret: bytes
    server_public: bytes


@dataclass(frozen=True)
class ServerKeys:
    """CURVE for a server: its key pair and the folder of public keys it accepts."""

    public: bytes
    secret: bytes
    allowed_dir: str


def check_secret_key_mode(path) -> None:
    """Raise TransportError if anyone but the owner may read or write the secret key file."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise TransportError(f"cannot read the CURVE key {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise TransportError(f"the secret key {path} has mode {mode:04o}: others may read it, and whoever reads it "
                             f"can pose as its owner; fix it with: chmod 600 {path}")


def _load(path, want_secret: bool) -> tuple[bytes, bytes | None]:
    if want_secret:
        check_secret_key_mode(path)
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot read the CURVE key {path}: {exc}") from None
    if want_secret and not secret:
        raise TransportError(f"{path} holds no secret key: give the .key_secret file")
    return public, secret


def client_keys(key_file, server_key_file) -> ClientKeys | None:
    """Keys from ``psgd keygen`` files: this client's .key_secret and the server's .key."""
    if not key_file and not server_key_file:
        return None
    if not (key_file and server_key_file):
        raise TransportError("CURVE needs both the client's secret key file and the server's public key file")
    public, secret = _load(key_file, True)
    return ClientKeys(public, secret, _load(server_key_file, False)[0])


def server_keys(secret_key_file, allowed_dir) -> ServerKeys | None:
    if not secret_key_file and not allowed_dir:
        return None
    if not (secret_key_file and allowed_dir):
        raise TransportError("CURVE needs both the server's secret key file and the folder of allowed client keys")
    if not Path(allowed_dir).is_dir():
        raise TransportError(f"the folder of allowed client keys {allowed_dir} does not exist")
    public, secret = _load(secret_key_file, True)
    return ServerKeys(public, secret, str(allowed_dir))


def allowed_roles(allowed_dir) -> dict[bytes, str]:
    """The z85 public keys a server accepts, each with its role: the ``*.key`` files of
    ``allowed_dir`` are workers', those of ``allowed_dir/control/`` control keys (a key in
    both is control)."""
    try:
        roles = {key: WORKER for key in zmq.auth.load_certificates(str(allowed_dir))}
        control = Path(allowed_dir) / CONTROL_KEYS_DIR
        if control.is_dir():
            roles.update({key: CONTROL for key in zmq.auth.load_certificates(str(control))})
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot read the allowed client keys in {allowed_dir}: {exc}") from None
    return roles


class _RoleAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, with each allowed key's role as the User-Id of its messages."""

    def __init__(self, context, roles: dict[bytes, str]):
        super().__init__(context)
        self.roles = roles

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.roles.get(z85.encode(client_public_key), WORKER)


def write_keypair(folder, name: str) -> tuple[Path, Path]:
    """``folder/name.key`` (public: hand it out) and ``folder/name.key_secret`` (keep it)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


CLUSTER_KEYS = ("server", "worker", "control")


def write_cluster_keys(folder) -> dict[str, Path]:
    """A whole cluster's keys in one folder, for recipes that make them at start:
    ``server.key``/``server.key_secret``, ``worker.key_secret`` and ``control.key_secret``
    (the clients' secret keys), and the server's allowed folder ``allowed/`` with
    ``worker.key`` in it and ``control.key`` in ``allowed/control/``. Keys already there
    are kept (a restarted cluster keeps its keys). Returns the paths by use:
    ``server_secret``, ``server_public``, ``allowed``, ``worker_secret``, ``control_secret``."""
    folder = Path(folder)
    allowed = folder / "allowed"
    if not (folder / "server.key_secret").exists():
        write_keypair(folder, "server")
    for name, where in (("worker", allowed), ("control", allowed / CONTROL_KEYS_DIR)):
        if not (folder / f"{name}.key_secret").exists():
            _, secret = write_keypair(where, name)
            secret.rename(folder / secret.name)  # the allowed folder holds public keys only
    return {"server_secret": folder / "server.key_secret", "server_public": folder / "server.key",
            "allowed": allowed, "worker_secret": folder / "worker.key_secret",
            "control_secret": folder / "control.key_secret"}


def max_message_bytes(n_params: int, itemsize: int) -> int:
    """The largest message a worker may send: one parameter range plus a header."""
    return n_params * itemsize + MAX_HEADER_BYTES + 4096


UNSIZED_WEIGHTS_BYTES = 4 * 1024 * 1024  # the weights a client takes before it knows their size


def max_reply_bytes(n_params: int | None = None, itemsize: int = 4) -> int:
    """The largest reply a client takes: a parameter range (of ``n_params``; None: not
    known yet, up to UNSIZED_WEIGHTS_BYTES) plus a header."""
    weights = UNSIZED_WEIGHTS_BYTES if n_params is None else n_params * itemsize
    return weights + MAX_REPLY_HEADER_BYTES + 4096


def parse_endpoints(connect: str | list[str]) -> list[str]:
    """``tcp://a:5555,tcp://b:5555`` (server shards in order) as a list."""
    endpoints = [e.strip() for e in connect.split(",")] if isinstance(connect, str) else list(connect)
    endpoints = [e for e in endpoints if e]
    if not endpoints:
        raise ConfigError("no server address given: --connect tcp://HOST:PORT[,tcp://HOST2:PORT2...]")
    return endpoints


def connect_clients(connect: str | list[str], name: str, **options) -> list[Client]:
    """One :class:`Client` per server shard; if one address is malformed, the sockets
    already made are closed before the error goes up."""
    clients: list[Client] = []
    try:
        for endpoint in parse_endpoints(connect):
            clients.append(Client(endpoint, name, **options))
    except ConfigError:
        for client in clients:
            client.close()
        raise
    return clients


class Client:
    """Request/reply to one server over a DEALER socket, surviving server restarts."""

    def __init__(self, endpoint: str, name: str, context: zmq.Context | None = None,
                 request_timeout: float = REQUEST_TIMEOUT_S, server_wait: float = SERVER_WAIT_S,
                 keys: ClientKeys | None = None, max_message: int | None = None):
        self.endpoint, self.name = endpoint, name
        self.keys = keys
        self.max_message = max_message or max_reply_bytes()  # no weights until told their size
        self.context = context or zmq.Context.instance()
        self.request_timeout, self.server_wait = request_timeout, server_wait
        self.seq = 0
        self.reconnects = 0
        self.socket = None
        self._interrupted = None  # the current request's stop check (see request)
        self._connect()

    def _connect(self):
        if self.socket is not None:
            self.socket.close(linger=LINGER_MS)
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        # A DEALER's send blocks while it has no live peer (a killed server's connection can
        # leave it so for good): bound it, and treat a send that cannot go as a lost try.
        self.socket.setsockopt(zmq.SNDTIMEO, int(self.request_timeout * 1000))
        # A reply larger than this drops the connection (a worker raises it to its range of
        # the weights once the welcome told it).
        self.socket.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        if self.keys is not None:
            self.socket.curve_publickey = self.keys.public
            self.socket.curve_secretkey = self.keys.secret
            self.socket.curve_serverkey = self.keys.server_public
        try:
            self.socket.connect(self.endpoint)
        except zmq.ZMQError as exc:  # only a malformed address fails here: connecting is lazy
            self.socket.close(linger=0)
            self.socket = None
            raise ConfigError(f"cannot connect to {self.endpoint!r}: {zmq.strerror(exc.errno)}; "
                              "an address looks like tcp://HOST:PORT") from None

    def transfer_allowance(self) -> float:
        """Seconds a request's try and wait grow by for the large replies this client takes
        (0 up to UNSIZED_WEIGHTS_BYTES of weights; an explicit timeout gets none)."""
        return max(0, self.max_message - max_reply_bytes()) / SLOW_TRANSFER_BYTES_PER_S

    def limit_messages(self, max_message: int) -> None:
        """Refuse replies above this size from now on (on a fresh socket: the option
        applies to new connections)."""
        if max_message != self.max_message:
            self.max_message = max_message
            self._connect()

    def request(self, header: dict, arrays=(), offsets=None, copy: bool = False,
                server_wait: float | None = None, request_timeout: float | None = None,
                interrupted=None) -> Message:
        """Send one request and return the decoded reply (which may be an ``error``).

        With ``copy=False`` the arrays are sent without copying: leave them unchanged
        until this returns. ``server_wait`` and ``request_timeout`` override the client's
        for this request alone (a goodbye need not wait a minute). ``interrupted()``, if
        given, is asked every ``POLL_INTERVAL_MS`` while the request waits (to be sent,
        for its reply, between tries): once true, :class:`Interrupted` ends the wait (a
        worker told to stop while its server is absent must not wait a minute)."""
        self.send(header, arrays, offsets, copy, server_wait, request_timeout, interrupted)
        return self.receive()

    def send(self, header: dict, arrays=(), offsets=None, copy: bool = False,
             server_wait: float | None = None, request_timeout: float | None = None,
             interrupted=None) -> None:
        """The first half of :meth:`request`: send now, and let :meth:`receive` wait (and
        retry). Several clients can so have one request each in flight at once."""
        self.seq += 1
        self._frames = encode({**header, "sender": self.name, "seq": self.seq}, arrays, offsets)
        allowance = self.transfer_allowance()
        self._wait = self.server_wait + allowance if server_wait is None else server_wait
        self._deadline = time.monotonic() + self._wait
        self._timeout = self.request_timeout + allowance if request_timeout is None else request_timeout
        self._interrupted = interrupted
        try:
            self._sent = self._try_send(copy)
        except BaseException:
            self._frames = None
            raise

    def receive(self) -> Message:
        """The reply to the request :meth:`send` sent, resending it on a fresh socket (with
        growing pauses) while none comes, until ``server_wait`` has passed."""
        pause = RECONNECT_BACKOFF_S[0]
        try:
            while True:
                if self._sent:
                    reply = self._await_reply(min(self._timeout, max(0.0, self._deadline - time.monotonic())))
                    if reply is not None:
                        return reply
                if time.monotonic() + pause >= self._deadline:
                    raise TransportError(f"no answer from {self.endpoint} for {self._wait:.0f} s; "
                                         "is the server running?")
                self._pause(pause)
                pause = min(pause * 2, RECONNECT_BACKOFF_S[1])
                self.reconnects += 1
                self._connect()
                # A retry copies: the first try's zero-copy frames may still be held by the
                # socket that was just closed, and are not sent twice.
                self._sent = self._try_send(copy=True)
        finally:
            self._frames = None

    def _check_interrupted(self) -> None:
        if self._interrupted is not None and self._interrupted():
            raise Interrupted(f"stopped while waiting for {self.endpoint}")

    def _poll(self, timeout: float, event: int) -> bool:
        """Whether the socket is ready for ``event`` within ``timeout`` seconds; with an
        ``interrupted`` check, in slices of POLL_INTERVAL_MS, asking it between them."""
        if self._interrupted is None:
            return bool(self.socket.poll(int(timeout * 1000) + 1, event))
        end = time.monotonic() + timeout
        while True:
            self._check_interrupted()
            remaining = end - time.monotonic()
            if self.socket.poll(max(1, min(POLL_INTERVAL_MS, int(remaining * 1000) + 1)), event):
                return True
            if remaining <= POLL_INTERVAL_MS / 1000:
                return False

    def _pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (remaining := end - time.monotonic()) > 0:
            self._check_interrupted()
            time.sleep(min(remaining, POLL_INTERVAL_MS / 1000) if self._interrupted is not None else remaining)

    def _try_send(self, copy: bool) -> bool:
        if self._interrupted is not None and not self._poll(self.request_timeout, zmq.POLLOUT):
            return False  # no peer to take it within the send timeout: a lost try
        try:
            self.socket.send_multipart(self._frames, copy=copy)
        except zmq.Again:
            return False  # no peer took it within the send timeout: a lost try
        return True

    def _await_reply(self, timeout: float) -> Message | None:
        end = time.monotonic() + timeout
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0 or not self._poll(remaining, zmq.POLLIN):
                return None
            frames = self.socket.recv_multipart(copy=False)
            try:
                msg = decode(frames, MAX_REPLY_HEADER_BYTES)
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

    def __init__(self, bind: str, max_message: int, context: zmq.Context | None = None,
                 keys: ServerKeys | None = None):
        self.context = context or zmq.Context.instance()
        self.authenticator = None
        self.keys = keys
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message)  # larger frames drop the connection
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if keys is not None:
            roles = allowed_roles(keys.allowed_dir)
            self.authenticator = _RoleAuthenticator(self.context, roles)
            self.authenticator.start()
            self.authenticator.allow_any = False
            self.authenticator.certs["*"] = roles  # a key is allowed where its role (non-empty) is found
            self.socket.curve_publickey = keys.public
            self.socket.curve_secretkey = keys.secret
            self.socket.curve_server = True
        try:
            if bind.endswith(":0"):
                port = self.socket.bind_to_random_port(bind[: bind.rindex(":")])
                bind = f"{bind[: bind.rindex(':')]}:{port}"
            else:
                self.socket.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise TransportError(f"cannot bind {bind}: {exc}") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self):
        """``(identity, frames)`` of the next message; frames are zero-copy zmq Frames."""
        frames = self.socket.recv_multipart(copy=False)
        return frames[0], frames[1:]

    def role(self, frames) -> str:
        """The role of the key that sent these frames (from :meth:`recv`): WORKER or
        CONTROL. Without CURVE there are no keys, hence no roles: CONTROL."""
        if self.keys is None:
            return CONTROL
        try:
            return CONTROL if frames[0].get("User-Id") == CONTROL else WORKER
        except (zmq.ZMQError, IndexError):
            return WORKER

    def send(self, identity, frames: list, copy: bool = True) -> None:
        self.socket.send_multipart([identity, *frames], copy=copy)

    def close(self):
        self.socket.close(linger=LINGER_MS)
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None


class Poller:
    """Waits on zmq sockets and plain file descriptors (the shared-memory doorbells) alike.

    Plain descriptors go into one epoll set (where the OS has it), which zmq_poll watches
    as a single descriptor: a wait then costs the same with 2 doorbells or 2,000, where
    zmq_poll alone walks every registered descriptor on every call (256 doorbells, one
    ready: 37 us per wait, against 5 us through epoll, measured on the 2-core dev machine)."""

    def __init__(self):
        self._poller = zmq.Poller()
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        if self._epoll is not None:
            self._poller.register(self._epoll.fileno(), zmq.POLLIN)

    def register(self, sock_or_fd) -> None:
        if self._epoll is not None and isinstance(sock_or_fd, int):
            self._epoll.register(sock_or_fd, select.EPOLLIN)
        else:
            self._poller.register(sock_or_fd, zmq.POLLIN)

    def unregister(self, sock_or_fd) -> None:
        if self._epoll is not None and isinstance(sock_or_fd, int):
            self._epoll.unregister(sock_or_fd)
        else:
            self._poller.unregister(sock_or_fd)

    def poll(self, timeout_ms: int) -> list:
        ready = []
        for s, _ in self._poller.poll(timeout_ms):
            if self._epoll is not None and s == self._epoll.fileno():
                ready.extend(fd for fd, _ in self._epoll.poll(0))
            else:
                ready.append(s)
        return ready

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
