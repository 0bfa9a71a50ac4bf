"""The dashboard's HTTP server: one page, its data, and ``/metrics``, from the standard
library's ``http.server`` in a daemon thread.

- ``/``: the page (psgd/coordinator/static/dashboard.html: hand-written HTML, CSS and
  JavaScript drawing inline SVG; nothing is fetched from elsewhere, so it works offline);
- ``/api/runs``: the runs' snapshots (psgd.coordinator.live), a JSON list; the page asks
  for it every ``REFRESH_S`` while a run is live;
- ``/metrics``: the first run in the Prometheus text format (psgd.coordinator.exporter).

It listens on 127.0.0.1 unless told another address: the page shows what the run is doing
and nothing more, but who may watch is the operator's choice to make.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from ..errors import ConfigError
from .exporter import CONTENT_TYPE, exposition, registry_for

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8050
REFRESH_S = 1.5


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``HOST`` (IPv6 in brackets: ``[::1]:8050``); a bare port
    listens on 127.0.0.1."""
    text = text.strip()
    host, port = DEFAULT_HOST, str(default_port)
    if text.isdigit():
        port = text
    elif text.startswith("["):
        head, _, rest = text[1:].partition("]")
        host, port = head, rest.lstrip(":") or port
    elif text.count(":") == 1:
        host, port = text.split(":")
        host = host or DEFAULT_HOST
    elif text:
        host = text
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"dashboard address {text!r}: the port must be a number 0..65535 (HOST:PORT or PORT)")
    return host, int(port)


def page() -> bytes:
    return resources.files(__package__).joinpath("static/dashboard.html").read_bytes()


class Dashboard:
    """Serves ``runs()`` (a callable returning the snapshot list) on ``address``."""

    def __init__(self, runs, address: tuple[str, int]):
        self.runs = runs
        self.registry = registry_for(lambda: runs()[0])
        handler = type("Handler", (_Handler,), {"dashboard": self})
        try:
            self.httpd = ThreadingHTTPServer(address, handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve the dashboard on {address[0]}:{address[1]}: "
                              f"{exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        host, port = self.httpd.server_address[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="psgd-dashboard", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard
    server_version = "psgd-dashboard"

    def do_GET(self):  # noqa: N802 (the standard library's name)
        path = self.path.split("?", 1)[0]
        try:
            if path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", page())
            elif path == "/api/runs":
                body = json.dumps(clean(self.dashboard.runs()), allow_nan=False).encode()
                self._send(200, "application/json", body)
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE, exposition(self.dashboard.registry))
            elif path == "/healthz":
                self._send(200, "text/plain", b"ok\n")
            else:
                self._send(404, "text/plain", b"not found: try / or /metrics\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away mid-answer
        except Exception as exc:  # a page must never take the run down: say it, answer 500
            log.warning(f"dashboard: {path}: {type(exc).__name__}: {exc}")
            try:
                self._send(500, "text/plain", f"{type(exc).__name__}: {exc}\n".encode())
            except OSError:
                pass

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (the standard library's name)
        log.debug("dashboard: " + format % args)


def clean(obj):
    """``obj`` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


class RunBoard:
    """The dashboard of one coordinated run, as ``psgd train --dashboard`` and ``psgd
    coordinator --dashboard`` use it: a :class:`LiveRun` to give the coordinator, served
    (with /metrics) from start to :meth:`close`. ``address`` None: a LiveRun, no server."""

    def __init__(self, address: str | None, config: dict, name: str = "live", say=None):
        from .live import LiveRun
        self.live = LiveRun(name=name, config=config)
        self.board = None
        if address is not None:
            self.board = Dashboard(lambda: [self.live.snapshot()], parse_address(address))
            if say is not None:
                say(f"psgd: dashboard at {self.board.url} (Prometheus metrics at {self.board.url}metrics)")

    def feed_from_server(self, state) -> None:
        """``psgd server --metrics``: the server loop hands its ServerState (in its own
        thread) about once a second; what the page and /metrics need is copied out here."""
        now = state.clock()
        stats = state.stats()
        self.live.on_stats(stats)
        self.live.on_workers({str(w): r.to_dict(now) for w, r in state.members.workers.items()})
        if stats.get("stopping"):
            self.live.finish({"stop_reason": stats.get("stop_reason")}, stats)

    def hold(self, seconds: float, stop=lambda: False) -> None:
        """Go on serving the finished run for ``seconds`` (a scraper's last look), or until
        ``stop()``."""
        end = time.monotonic() + seconds
        while self.board is not None and time.monotonic() < end and not stop():
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None
