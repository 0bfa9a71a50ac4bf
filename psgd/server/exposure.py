"""Where a server may listen: loopback unless its traffic is authenticated, or the
operator said ``--insecure`` (PSGD_INSECURE=1) in plain sight.

A plaintext server has no keys and so no roles: whoever reaches its port may push any
gradient into the weights, read them, change the learning rate, pause the run or end it.
Like Redis in protected mode, psgd therefore listens only on the loopback interface
unless CURVE is on; listening elsewhere in plaintext needs an explicit opt-in and prints
:data:`INSECURE_WARNING`. Pure: no sockets.
"""

from __future__ import annotations

from ..errors import ConfigError

PORT = 5555
LOOPBACK_BIND = f"tcp://127.0.0.1:{PORT}"  # the default without CURVE
ANY_BIND = f"tcp://*:{PORT}"  # the default with CURVE: its keys decide who gets in

INSECURE_WARNING = ("psgd: WARNING: listening on {bind} in plaintext, without CURVE keys (--insecure): anyone who "
                    "can reach this port can read the weights, push any gradient into them, change the learning "
                    "rate, pause the run or end it. Use psgd keygen and --curve-secret-key/--curve-allow "
                    "(docs/security.md).")


def is_loopback(endpoint: str) -> bool:
    """True for an endpoint only this machine can reach: tcp on 127.x, ::1, localhost or
    the lo interface, and ipc:// or inproc://."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp" or ":" not in address:
        return False
    host = address[: address.rindex(":")]
    if ";" in host:  # tcp://SOURCE;HOST:PORT names the interface after the semicolon
        host = host.split(";")[-1]
    host = host.strip("[]").lower()
    return host in ("localhost", "::1", "lo") or host.startswith("127.")


def resolve_bind(bind: str | None, curve: bool, insecure: bool) -> tuple[str, str | None]:
    """``(endpoint to bind, warning to print or None)`` for ``--bind`` (None: the
    default), whether CURVE is on, and whether the operator allowed plaintext elsewhere.
    Raises ConfigError for a plaintext non-loopback address without ``insecure``."""
    if bind is None:
        bind = ANY_BIND if curve else LOOPBACK_BIND
    if curve or is_loopback(bind):
        return bind, None
    if not insecure:
        raise ConfigError(f"refusing to listen on {bind} in plaintext: anyone who can reach it could change the "
                          "weights or end the run. Use CURVE keys (psgd keygen; --curve-secret-key, --curve-allow), "
                          "or say --insecure (PSGD_INSECURE=1) to accept that on a network you trust")
    return bind, INSECURE_WARNING.format(bind=bind)
