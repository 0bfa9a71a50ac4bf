"""``psgd report``: what a run directory says, as text and as PNG plots.

Text needs nothing beyond psgd. Plots need matplotlib (``pip install 'psgd[plot]'``);
without it the report says so and prints the text anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from ..metrics import StalenessHistogram

TARGETS = (0.97, 0.98)


class Run:
    """A run directory: config.json, metrics.jsonl, summary.json."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: no such run directory")
        try:
            self.config = json.loads((self.path / "config.json").read_text())
            self.summary = json.loads((self.path / "summary.json").read_text())
            self.records = [json.loads(line) for line in (self.path / "metrics.jsonl").read_text().splitlines() if line]
        except FileNotFoundError as exc:
            raise DataError(f"{self.path} is not a finished psgd run: {Path(exc.filename).name} is missing") from None
        except ValueError as exc:
            raise DataError(f"{self.path}: unreadable run file ({exc})") from None

    @property
    def name(self) -> str:
        return self.path.name

    def time_to(self, accuracy: float) -> float | None:
        """Training seconds (start-up and evaluation excluded) to a validation accuracy."""
        return next((r["train_time"] for r in self.records if (r.get("val_accuracy") or 0) >= accuracy), None)

    def staleness(self) -> StalenessHistogram | None:
        h = self.summary.get("staleness_histogram")
        return StalenessHistogram.from_dict(h) if h else None


def traffic_line(traffic: dict) -> str:
    """Payload bytes (array frames) by direction and codec, as one report line."""
    def part(by_codec):
        return ", ".join(f"{codec} {n / 1e6:.2f} MB" for codec, n in sorted(by_codec.items())) or "none"
    return f"payload pushed: {part(traffic.get('pushed', {}))}; pulled by workers: {part(traffic.get('pulled', {}))}"


def rollback_line(rollbacks: list[dict], examples: int, n_train: int) -> str:
    """The rollbacks in one line: the epochs trained count the examples trained again, so
    say how many the weights kept."""
    discarded = sum(r.get("examples_discarded", 0) for r in rollbacks)
    went = "; ".join(f"at update {r['at_update']} to {r['to_update']}, rate {r['lr']:.4g}" for r in rollbacks)
    return (f"{len(rollbacks)} rollback{'s' if len(rollbacks) > 1 else ''} ({went}): {discarded} examples trained "
            f"again, so {(examples - discarded) / n_train:.2f} of the {examples / n_train:.2f} epochs trained were kept")


def momentum_line(rule: dict) -> str:
    """What the server's momentum rule (psgd.model.momentum_rule) had chosen at the end."""
    if rule["rule"] != "adaptive":
        return f"momentum rule fixed: momentum {rule['momentum']:.3g}, rate as scheduled"
    return (f"momentum rule adaptive: momentum {rule['momentum']:.3g} (configured {rule['target']:.3g}), rate x "
            f"{rule['lr_factor']:.3g}, for a recent staleness mean of {rule['staleness_mean']:.2f}")


def _optimizer(o: dict) -> str:
    if o["name"] in ("adam", "adamw"):
        return f"{o['name']} ({o.get('beta1', 0.9)}, {o.get('beta2', 0.999)})"
    return f"{o['name']} {o['momentum']}" if o["name"] in ("momentum", "nesterov") else o["name"]


def _seconds(x):
    return f"{x:.2f} s" if x is not None else "not reached"


INNER_RATE = {"run": "at the run's schedule", "constant": "at a constant rate"}  # older runs: constant


def text_report(run: Run) -> list[str]:
    c, s = run.config, run.summary
    m = c["model"]
    lines = [
        f"run {run.path}",
        f"  model {'-'.join(map(str, m['sizes']))} {m['hidden']}/{m['loss']} {m['dtype']}; "
        f"{_optimizer(c['optimizer'])}, lr {c['schedule']['lr']} "
        f"{c['schedule']['name']}; batch {c['batch_size']}",
        f"  cluster: {s.get('workers', 0)} workers" + (
            f", {s.get('consistency', 'async')}, staleness rule {s.get('staleness_rule', 'none')}, "
            f"pushes via {', '.join(s.get('worker_transports', [])) or '-'}"
            + (f"; local SGD, {c.get('local_steps')} {c.get('inner_optimizer')} steps per push "
               f"({INNER_RATE.get(c.get('inner_schedule', 'constant'), 'at an unknown rate')}), outer lr "
               f"{c.get('outer_lr')}, momentum {c.get('outer_momentum') if c.get('outer_momentum') is not None else 'default'}" if c.get("algorithm") == "local" else "")
            if s.get("workers") else " (one process)"),
    ]
    if s.get("virtual_time"):  # psgd simulate: every time below is virtual
        lines.append("  simulated (psgd simulate): times and rates are in virtual seconds")
    acc = s.get("test_accuracy")
    lines.append(f"  result: test accuracy {acc:.2%}, loss {s['test_loss']:.4f}" if acc is not None
                 else f"  result: test loss {s['test_loss']:.6f}")
    lines.append(f"  stopped on {s.get('stop_reason', 'epochs')} after {s['epochs']:.2f} epochs, {s['updates']} updates")
    wall = s["wall_time"]
    other = max(0.0, wall - s["setup_time"] - s["train_time"] - s["eval_time"])
    lines.append("  where the time went: " + ", ".join(
        f"{name} {t:.2f} s ({t / wall:.0%})" for name, t in
        (("start-up", s["setup_time"]), ("training", s["train_time"]), ("evaluation", s["eval_time"]),
         ("wind-down", other))))
    lines.append(f"  throughput: {s['examples_per_s'] / 1e3:.1f}k examples/s"
                 + (f", {s['pushes_per_s']:.0f} pushes/s" if "pushes_per_s" in s else ""))
    lines.append("  time to " + ", ".join(f"{a:.0%}: {_seconds(run.time_to(a))}" for a in TARGETS))
    if s.get("momentum_rule"):
        lines.append("  " + momentum_line(s["momentum_rule"]))
    if s.get("rollbacks") and s.get("epochs"):
        lines.append("  " + rollback_line(s["rollbacks"], s["examples"], s["examples"] / s["epochs"]))
    hist = run.staleness()
    if hist is not None and hist.total:
        sm = hist.summary()
        top = sorted(((c, v) for v, c in enumerate(hist.counts) if c), reverse=True)[:6]
        lines.append(f"  staleness: mean {sm['mean']:.2f}, {StalenessHistogram.text(sm)} "
                     f"over {sm['count']} pushes; most common: "
                     + ", ".join(f"{v}{'+' if v == hist.cap else ''} ({c / hist.total:.0%})" for c, v in top))
    if s.get("traffic") and (s["traffic"].get("pushed") or s["traffic"].get("pulled")):
        lines.append(f"  codecs: push {s.get('push_codec', 'none')}, pull {s.get('pull_codec', 'none')}; "
                     + traffic_line(s["traffic"]))
    per_worker = s.get("per_worker") or {}
    if per_worker:
        flagged = set(s.get("stragglers", []))
        lines.append(f"  {'worker':<12} {'pushes':>7} {'examples':>9} {'ex/s':>8} {'staleness':>9}  path")
        for name, w in sorted(per_worker.items()):
            lines.append(f"  {name:<12} {w['pushes']:>7} {w['examples']:>9} {w['examples_per_s']:>8.0f} "
                         f"{w['staleness']['mean']:>9.2f}  {w['transport']}"
                         + ("  STRAGGLER" if name in flagged else "")
                         + (f"  {w['outliers']} OUTLIERS refused" if w.get("outliers") else "")
                         + ("  FLAGGED" if w.get("flagged") else "") + ("" if w["connected"] else "  (gone)")
                         + (f"  (joined {w['records']} times)" if w.get("records", 1) > 1 else "")
                         + (f"  {w['push_codec']}/{w['pull_codec']} {w['bytes_pushed'] / 1e6:.2f}/"
                            f"{w['bytes_pulled'] / 1e6:.2f} MB pushed/pulled" if "bytes_pushed" in w else ""))
    if s.get("flagged_workers"):
        lines.append("  flagged workers (gradients refused again and again by the outlier guard): "
                     + ", ".join(s["flagged_workers"]))
    lines += time_table(per_worker)
    for failure in s.get("failures", []):
        lines.append(f"  failed: {failure}")
    return lines


TIME_PHASES = ("batch", "compute", "sleep", "push", "pull", "other")  # the worker's (psgd.worker.timing)


def time_table(per_worker: dict) -> list[str]:
    """Where each worker's time went: the share of its wall time per phase, and examples/s."""
    rows = [(name, w) for name, w in sorted(per_worker.items()) if w.get("time_shares")]
    if not rows:
        return []
    lines = ["  where each worker's time went (share of its wall time):",
             f"  {'worker':<12} " + " ".join(f"{p:>7}" for p in TIME_PHASES) + f" {'wall s':>7} {'ex/s':>8}"]
    for name, w in rows:
        shares = w["time_shares"]
        lines.append(f"  {name:<12} " + " ".join(f"{shares.get(p, 0.0):>7.1%}" for p in TIME_PHASES)
                     + f" {w['timing']['wall']:>7.1f} {w['examples_per_s']:>8.0f}")
    return lines


def comparison(runs: list[Run]) -> list[str]:
    """Runs side by side: time to target accuracy, final accuracy, staleness, throughput."""
    head = f"{'run':<20} {'workers':>7} {'mode':<6} {'to 97%':>9} {'to 98%':>9} {'test acc':>8} {'staleness':>9} {'ex/s':>7}"
    lines = [head]
    for r in runs:
        s = r.summary
        hist = r.staleness()
        acc = s.get("test_accuracy")
        name = r.name[:19] + "*" if s.get("virtual_time") else r.name[:20]
        lines.append(
            f"{name:<20} {s.get('workers', 0):>7} {s.get('consistency', '-') if s.get('workers') else '-':<6} "
            f"{_short(r.time_to(0.97)):>9} {_short(r.time_to(0.98)):>9} "
            f"{(f'{acc:.2%}' if acc is not None else '-'):>8} "
            f"{(f'{hist.mean():.2f}' if hist is not None else '-'):>9} {s['examples_per_s'] / 1e3:>6.1f}k")
    if any(r.summary.get("virtual_time") for r in runs):
        lines.append("* simulated (psgd simulate): its times and rates are virtual seconds")
    return lines


def _short(x):
    return f"{x:.2f}s" if x is not None else "-"


def plot_run(run: Run, out_dir: Path) -> list[Path]:
    """PNG plots of one run into ``out_dir``; returns their paths. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    recs = run.records
    t = [r["time"] for r in recs]
    upd = [r["updates"] for r in recs]
    written = []

    def save(fig, name):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    for key, label in (("val_accuracy", "validation accuracy"), ("val_loss", "validation loss")):
        values = [r[key] for r in recs]
        if all(v is None for v in values):
            continue
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(t, values, marker="o")
        a.set_xlabel("wall time (s)")
        b.plot(upd, values, marker="o", color="tab:orange")
        b.set_xlabel("updates applied")
        for ax in (a, b):
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{run.name}: {label}")
        save(fig, f"{key}.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(t, [r["lr"] for r in recs], where="post")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{run.name}: learning rate")
    save(fig, "learning_rate.png")

    hist = run.staleness()
    if hist is not None and hist.total:
        last = max(v for v, c in enumerate(hist.counts) if c)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(range(last + 1), hist.counts[:last + 1])
        ax.set_xlabel("staleness (updates between fetch and apply)" + (f"; {hist.cap} = {hist.cap} or more" if last == hist.cap else ""))
        ax.set_ylabel("pushes")
        ax.set_title(f"{run.name}: staleness, mean {hist.mean():.2f}")
        save(fig, "staleness.png")

    per_worker = run.summary.get("per_worker") or {}
    if per_worker:
        names = sorted(per_worker)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(names, [per_worker[n]["examples_per_s"] for n in names])
        ax.set_ylabel("examples/s")
        ax.set_title(f"{run.name}: throughput per worker")
        save(fig, "worker_throughput.png")
    return written


def plot_comparison(runs: list[Run], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        acc = [x["val_accuracy"] for x in r.records]
        a.plot([x["train_time"] for x in r.records], acc, marker=".", label=r.name)
        b.plot([x["updates"] for x in r.records], acc, marker=".", label=r.name)
    a.set_xlabel("training time (s)")
    b.set_xlabel("updates applied")
    for ax in (a, b):
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
