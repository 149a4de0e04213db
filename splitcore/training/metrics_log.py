"""Trainer callbacks for the command line: a metrics JSONL file and a progress display."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TextIO

from splitcore.training.trainer import CheckpointSaved, EvalMetrics, StepMetrics, TrainerEvent


class MetricsJsonl:
    """One JSON object per optimizer step and per evaluation, flushed as they happen.

    On resume from step N, rows after N (written before a crash, about to be redone)
    are dropped so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resume_step:
                    kept.append(line)
        self._file = open(self.path, "w", encoding="utf-8")
        for line in kept:
            self._file.write(line + "\n")
        self._file.flush()

    def __call__(self, event: TrainerEvent) -> None:
        if isinstance(event, StepMetrics):
            row = {"step": event.step, "loss": event.loss, "lr": event.lr, "grad_norm": event.grad_norm,
                   "tokens_per_s": event.tokens_per_s, "wire_bytes": event.wire_bytes, "elapsed_s": event.elapsed_s}
        elif isinstance(event, EvalMetrics):
            row = {"step": event.step, "val_loss": event.val_loss}
        else:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ProgressReporter:
    """A tqdm bar on a terminal; plain lines (every evaluation and checkpoint) otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.interactive = stream.isatty()
        self._bar = None

    def __call__(self, event: TrainerEvent) -> None:
        if isinstance(event, StepMetrics):
            if self.interactive:
                self._update_bar(event)
            elif event.step == event.total_steps or event.step == 1:
                self._line(f"step {event.step}/{event.total_steps}: loss {event.loss:.4f}, lr {event.lr:.2e}")
        elif isinstance(event, EvalMetrics):
            self._line(f"step {event.step}: validation loss {event.val_loss:.4f}")
        elif isinstance(event, CheckpointSaved):
            self._line(f"step {event.step}: checkpoint {event.path}")

    def _update_bar(self, event: StepMetrics) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=event.total_steps, initial=event.step - 1, unit="step", file=self.stream,
                             dynamic_ncols=True)
        self._bar.update(event.step - self._bar.n)
        self._bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", tok_s=f"{event.tokens_per_s:.0f}")

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
