"""``psgd worker --count K``: K workers from one command, one process each (as a cluster node
with K cores would run them), started together and reaped together.

The command's own process only supervises: it starts K ``psgd worker`` processes with the
same options (``--name NAME-i`` when a name is given), passes a Ctrl-C or SIGTERM on to
them as a warm stop (a second one kills them), and exits once all have ended: with the
worst status of a worker that failed, else 128 + the signal that stopped it (130 after a
Ctrl-C), else 0. Each child gets the launcher's parent-death signal, so even a supervisor
killed outright leaves no worker behind.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from ..launch import TERMINATE_GRACE_S, _child_setup

log = logging.getLogger(__name__)
POLL_S = 0.2


def run_group(count: int, child_args: list[str], name: str, group_args: list[str] = ()) -> int:
    """Start ``count`` workers (``psgd [group_args] worker [child_args] --count 1 --name ...``),
    wait for all of them; return the worst status of a worker that failed, else 128 + the
    first signal this process got (a warm stop asked for), else 0."""
    children: list[subprocess.Popen] = []
    signals = []

    def handler(signum, frame):
        signals.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM if len(signals) == 1 else signal.SIGKILL)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for i in range(count):
            if signals:  # stopped while starting them: start no more
                break
            names = ["--name", f"{name}-{i}"] if name else []
            children.append(subprocess.Popen(
                [sys.executable, "-m", "psgd", *group_args, "worker", *child_args, "--count", "1", *names],
                stdin=subprocess.DEVNULL, preexec_fn=_child_setup))
        log.info(f"started {count} workers (pids {', '.join(str(c.pid) for c in children)})")
        while any(child.poll() is None for child in children):
            time.sleep(POLL_S)
    finally:
        for child in children:  # an exception here (or a second signal): no child outlives us
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for child in children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for sig, old in previous.items():
            signal.signal(sig, old)
    codes = [child.returncode for child in children]
    failed = [(i, code) for i, code in enumerate(codes) if code != 0 and code not in stopped_as_asked(signals)]
    for i, code in failed:
        log.warning(f"worker {i} of {count} " + (f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"))
    if failed:
        return max(abs(code) for _, code in failed)
    return 128 + signals[0] if signals else 0  # 130 after a Ctrl-C, as psgd train and a single worker


def stopped_as_asked(signals: list[int]) -> set[int]:
    """Exit statuses of a child that did what the signals passed on to it asked: a warm
    stop (128 + SIGTERM), or death by the SIGTERM itself when it came before the worker
    had set up its handlers (it had not joined: nothing to say goodbye to); after a
    second signal, death by SIGKILL too."""
    if not signals:
        return set()
    return {128 + signal.SIGTERM, -signal.SIGTERM} | ({-signal.SIGKILL} if len(signals) > 1 else set())
