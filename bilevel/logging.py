"""Run output: a progress bar, a JSONL metrics file, and Weights & Biases.

All three are :class:`~bilevel.solve.Callback` objects passed to :func:`bilevel.solve`.
W&B is optional (``pip install bilevel[wandb]``); without credentials it runs offline, so a run
never blocks on a login prompt.
"""
from __future__ import annotations

import json
import sys
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional

from .solve import Callback

#: Metrics shown first in the progress bar when present.
_HEADLINE = ("grad_norm_sq", "test_accuracy", "f1", "inner_distance", "val_loss")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.4f}"
    return str(value)


class ProgressBar(Callback):
    """A tqdm bar over the outer iterations, showing the latest metrics."""

    def __init__(self, total: int, description: Optional[str] = None, position: int = 0):
        self.total, self.description, self.position = total, description, position
        self._bar = None

    def on_start(self, info):
        from tqdm.auto import tqdm
        desc = self.description or f"{info['solver']} on {info['problem']}"
        interactive = sys.stderr.isatty()
        self._bar = tqdm(total=self.total, desc=desc, position=self.position, leave=True, dynamic_ncols=True,
                         mininterval=0.1 if interactive else 10.0)

    def on_step(self, iteration):
        if self._bar is not None:
            self._bar.update(1)

    def on_eval(self, record):
        if self._bar is None:
            return
        shown = [k for k in _HEADLINE if k in record][:3]
        self._bar.set_postfix({k: _fmt(record[k]) for k in shown}, refresh=False)

    def on_end(self, result):
        self.on_error(None)

    def on_error(self, error):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_config"):  # a step-size schedule (bilevel.schedules.PolyDecay)
        return _jsonable(value.to_config())
    return repr(value)


class JsonlLogger(Callback):
    """Appends one JSON object per evaluation to ``path`` and flushes it at once, so a run that
    stops (error, Ctrl-C) keeps every record written before. The first line, with
    ``"event": "start"``, holds the run's description.

    Each line is appended whole or not at all: when a write fails (a full disk) the file is cut
    back to its previous length and the OSError, naming the file, is raised. A kill -9 in the
    middle of a write can still leave a torn last line; :func:`read_jsonl` skips it."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def _write(self, obj: Dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "ab", buffering=0)
        data = (json.dumps(_jsonable(obj)) + "\n").encode("utf-8")
        offset = self._file.seek(0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):
                written += self._file.write(data[written:])
        except OSError as exc:
            try:
                self._file.truncate(offset)
            except OSError:
                pass
            raise OSError(exc.errno, f"cannot append to {self.path} ({exc.strerror or exc}); the file keeps its "
                                     "complete lines") from exc

    def on_start(self, info):
        self._write({"event": "start", **info})

    def on_eval(self, record):
        self._write({"event": "eval", **record})

    def on_end(self, result):
        self._write({"event": "end", "iterations": result.iterations, "wall_time": result.wall_time,
                     "counts": dict(result.counts)})
        self._close()

    def on_error(self, error):
        self._write({"event": "error", "error": f"{type(error).__name__}: {error}"})
        self._close()

    def _close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path) -> list:
    """The evaluation records of a JSONL metrics file. A torn last line (left by a process
    killed while writing) is skipped; a damaged line elsewhere raises ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was cut short
                continue
            raise ValueError(f"{path}, line {number}: not valid JSON") from None
        if record.get("event") == "eval":
            records.append(record)
    return records


class WandbLogger(Callback):
    """Logs every evaluation record to Weights & Biases.

    ``mode`` is passed to ``wandb.init``; when it is None, ``WANDB_MODE`` decides, and without
    it and without an API key (``WANDB_API_KEY`` or a netrc login) the run is offline, synced
    later with ``wandb sync``.
    """

    def __init__(self, project: str = "bilevel", name: Optional[str] = None, group: Optional[str] = None,
                 mode: Optional[str] = None, directory: Optional[str] = None, config: Optional[dict] = None):
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise ImportError("W&B logging needs the wandb package: pip install 'bilevel[wandb]'") from exc
        self.project, self.name, self.group, self.directory = project, name, group, directory
        self.mode = mode or os.environ.get("WANDB_MODE") or (None if _has_wandb_credentials() else "offline")
        self.config = config or {}
        self.run = None

    def on_start(self, info):
        import wandb
        if self.directory:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.project, name=self.name, group=self.group, mode=self.mode,
                              dir=self.directory, config={**self.config, **_jsonable(info)}, reinit="finish_previous")

    def on_eval(self, record):
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        self.run.log(metrics, step=record["iteration"])

    def on_end(self, result):
        for key, value in result.final.items():
            if isinstance(value, (int, float)):
                self.run.summary[key] = value
        self.run.finish()
        self.run = None

    def on_error(self, error):
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
