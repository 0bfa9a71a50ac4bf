"""The run directory: config.json, metrics.jsonl (one record per evaluation),
summary.json and weights.npz. Files another process may read are written atomically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from ..files import atomic_write
from ..model.modelio import save_model


class RunRecorder:
    """Collects evaluation records and writes the run directory (if there is one).

    Each record: ``time`` (s since start), ``train_time`` (s, evaluation excluded),
    ``epoch``, ``examples``, ``updates``, ``lr``, ``train_loss``, ``val_loss``,
    ``val_accuracy``, plus whatever the caller adds (staleness, throughput).

    A write that fails (a full disk) is said (``say``) and the run goes on: the records are
    kept in memory and every file is tried again at the end; ``write_failures`` lists what
    could not be written, and the summary carries it.
    """

    def __init__(self, config: TrainConfig, on_event=None, append: bool = False, say=None):
        self.config = config
        self.on_event = on_event or (lambda kind, info: None)
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.records: list[dict] = []
        self.write_failures: list[str] = []
        self._unwritten: set[str] = set()  # files to write (again) at the end
        self._metrics = None
        self.out = Path(config.out_dir) if config.out_dir else None
        if self.out:
            metrics = self.out / "metrics.jsonl"
            if append and metrics.exists():  # a resumed run goes on where the old one stopped
                self.records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
            self._try("config.json", lambda: atomic_write(self.out / "config.json", config.to_json() + "\n"))
            self._try("metrics.jsonl", lambda: self._open_metrics(append))

    def _open_metrics(self, append: bool):
        self.out.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.out / "metrics.jsonl", "a" if append else "w")

    def _try(self, name: str, write, finishing: bool = False) -> bool:
        """Run ``write`` (of the file ``name``); on OSError say so (during training: once per
        file until it works again; at the end the caller says what is missing), go on."""
        try:
            write()
            self._unwritten.discard(name)
            return True
        except OSError as exc:
            message = f"cannot write {self.out / name}: {exc.strerror or exc}"
            if name not in self._unwritten and not finishing:
                self.say(f"psgd: {message}; training goes on (tried again at the end)")
            self._unwritten.add(name)
            self.write_failures.append(message)
            return False

    def record(self, rec: dict) -> None:
        self.records.append(rec)
        if self.out and "metrics.jsonl" not in self._unwritten:
            def append():
                self._metrics.write(json.dumps(rec) + "\n")
                self._metrics.flush()
            self._try("metrics.jsonl", append)
        self.on_event("eval", rec)

    def first_reaching(self, accuracy: float) -> dict | None:
        return next((r for r in self.records if (r.get("val_accuracy") or 0) >= accuracy), None)

    def finish(self, params: np.ndarray, summary: dict) -> dict:
        """Write weights and summary (and whatever failed before); the summary's
        ``unwritten`` lists the files that still could not be written."""
        if self.out:
            if self._metrics is not None:
                try:
                    self._metrics.close()
                except OSError:  # its buffered tail could not go out: rewritten whole below
                    self._unwritten.add("metrics.jsonl")
            if "metrics.jsonl" in self._unwritten:
                lines = "".join(json.dumps(r) + "\n" for r in self.records)
                self._try("metrics.jsonl", lambda: atomic_write(self.out / "metrics.jsonl", lines), True)
            if "config.json" in self._unwritten:
                self._try("config.json", lambda: atomic_write(self.out / "config.json", self.config.to_json() + "\n"), True)
            self._try("weights.npz", lambda: save_model(self.out / "weights.npz", self.config.model, params), True)
            summary["write_failures"] = self.write_failures
            summary["unwritten"] = sorted(self._unwritten)
            if not self._try("summary.json", lambda: atomic_write(self.out / "summary.json",
                                                                  json.dumps(summary, indent=2) + "\n"), True):
                summary["unwritten"] = sorted(self._unwritten)
        return summary
