"""Every exception psgd raises on purpose, in one flat list.

Callers catch :class:`PsgdError` to tell a user-facing problem (bad option, bad file,
bad message) from a bug. The CLI turns a ``PsgdError`` into a one-line message.
"""


class PsgdError(Exception):
    """Base class: a problem with input, data or a peer, never a bug in psgd."""


class ConfigError(PsgdError):
    """An option or configuration value that cannot work (unknown activation, bad layer list)."""


class DataError(PsgdError):
    """A data file that is missing, truncated, corrupt, or of the wrong shape."""


class DownloadError(DataError):
    """Every mirror failed; the message names them and says how to place files by hand."""


class ProtocolError(PsgdError):
    """A wire message that is malformed, of an unknown version, or does not fit the model.

    ``code`` is a short stable string that goes into the error reply (see docs/protocol.md).
    ``seq`` is the request's sequence number when its header could be read (the error
    reply echoes it, so that the client can match it), else None.
    """

    def __init__(self, code: str, message: str, seq: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = message
        self.seq = seq


class TransportError(PsgdError):
    """A peer that did not answer within its deadline, or went away."""


class ShutdownRequested(PsgdError):
    """The server told this worker that the run is over (a clean end, not a failure)."""


class Interrupted(Exception):
    """A signal (Ctrl-C, SIGTERM) stopped a command before it had done anything worth
    keeping: a worker that had not joined, a run stopped before its first update. Not a
    PsgdError (nothing went wrong): the CLI says so in one line and exits 130."""


class ColdStop(KeyboardInterrupt):
    """A second Ctrl-C, after a first asked for a warm stop: stop at once. A
    KeyboardInterrupt still (whatever catches that for clean-up still runs), but the CLI
    tells it from a first Ctrl-C that came before a command took Ctrl-C over."""
