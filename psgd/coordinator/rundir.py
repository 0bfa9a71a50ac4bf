"""The run directory: config.json, metrics.jsonl (one record per evaluation),
summary.json and weights.npz. Files another process may read are written atomically."""

from __future__ import annotations

import json
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
    """

    def __init__(self, config: TrainConfig, on_event=None, append: bool = False):
        self.config = config
        self.on_event = on_event or (lambda kind, info: None)
        self.records: list[dict] = []
        self.out = Path(config.out_dir) if config.out_dir else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write(self.out / "config.json", config.to_json() + "\n")
            metrics = self.out / "metrics.jsonl"
            if append and metrics.exists():  # a resumed run goes on where the old one stopped
                self.records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
            self._metrics = open(metrics, "a" if append else "w")

    def record(self, rec: dict) -> None:
        self.records.append(rec)
        if self.out:
            self._metrics.write(json.dumps(rec) + "\n")
            self._metrics.flush()
        self.on_event("eval", rec)

    def first_reaching(self, accuracy: float) -> dict | None:
        return next((r for r in self.records if (r.get("val_accuracy") or 0) >= accuracy), None)

    def finish(self, params: np.ndarray, summary: dict) -> dict:
        if self.out:
            self._metrics.close()
            save_model(self.out / "weights.npz", self.config.model, params)
            atomic_write(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
