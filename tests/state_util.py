"""Helpers for tests that drive a ServerState directly, without sockets."""

from psgd.server.state import APPLIED


def apply(state, worker_id, base_version, examples, grad, offset=None):
    """Push through the state's one door and insist that it was applied now; return
    ``(version, staleness)``."""
    decision = state.push(worker_id, base_version, examples, grad, offset)
    assert decision.outcome == APPLIED, decision
    return decision.version, decision.staleness
