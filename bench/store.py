"""The results store: one directory per run, raw samples kept so any report can be recomputed.

Layout of `results/<run-id>/`:

- `run.json`: run id, creation time, state, the full configuration and environment, and extra
  fields added later (hook overhead, calibration). Rewritten atomically (temp file + os.replace),
  so a reader never sees half of it.
- `samples.jsonl`: append-only log, one JSON object per line, `kind` says what it is:
  `sample` (a `Sample`), `block_done` (completion marker), `failure`, or any extra kind.
  Each block is one write of its sample lines followed by its `block_done` marker, then
  flush + fsync. A block counts only through its marker, and its samples are exactly the
  `n_samples` lines right before it, so lines left by a write that was killed midway are
  ignored even when the same block is written again on resume.
- `summary.csv`, `report.md`: written whole by the analysis and report (atomic replace).

Only the parent (runner) process writes; workers send their samples back to it. With a single
writer there is no need for cross-process locking, and the store keeps no lock files.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import CompoundError
from core.jsonio import json_safe
from core.samples import Sample

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
SAMPLES_JSONL = "samples.jsonl"
SUMMARY_CSV = "summary.csv"

STATES: tuple[str, ...] = ("running", "complete", "interrupted")
SAMPLE_COLUMNS: tuple[str, ...] = (
    "config",
    "block",
    "metric",
    "value",
    "unit",
    "module",
    "source",
    "t_start",
    "t_end",
    "extra",
)
FAILURE_COLUMNS: tuple[str, ...] = ("config", "block", "error", "time")

_META_KEYS = ("run_id", "created", "state", "config", "environment")
_LOG_KINDS = ("sample", "block_done", "failure")
_STORE_FILES = (RUN_JSON, SAMPLES_JSONL)
_RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SAMPLE_DTYPES = {
    "config": "str",
    "block": "int64",
    "metric": "str",
    "value": "float64",
    "unit": "str",
    "module": "str",
    "source": "str",
    "t_start": "float64",
    "t_end": "float64",
}
_TAIL_CHUNK = 1 << 16


def new_run_id() -> str:
    """A run id that sorts by creation time (UTC, to the second) with a random suffix."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def list_runs(results_dir: Path) -> list[str]:
    """Ids of the runs under `results_dir` (directories holding a run.json), sorted."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    return sorted(p.name for p in results_dir.iterdir() if (p / RUN_JSON).is_file())


@dataclass
class LoadedRun:
    """Everything one run holds, read once, for the analysis."""

    meta: dict[str, Any]
    samples: pd.DataFrame
    failures: pd.DataFrame
    extras: list[dict[str, Any]] = field(default_factory=list)


def load_run(path: Path) -> LoadedRun:
    """Read the run directory at `path`; CompoundError when it is not a readable run."""
    path = Path(path)
    store = RunStore.open(path.parent, path.name)
    parsed = _read_log(store.samples_path)
    return LoadedRun(
        meta=store.meta,
        samples=_samples_frame(parsed.samples),
        failures=_failures_frame(parsed.failures),
        extras=parsed.extras,
    )


class RunStore:
    """Writer and reader of one run directory; build it with `create` or `open`."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self._meta = meta
        self._done: set[tuple[str, int]] | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        results_dir: Path,
        config: dict[str, Any],
        environment: dict[str, Any],
        run_id: str | None = None,
    ) -> RunStore:
        """Start a new run; refuses to reuse a directory that already holds run data."""
        results_dir = Path(results_dir)
        if run_id is None:
            run_id = new_run_id()
            while (results_dir / run_id).exists():
                run_id = new_run_id()
        _check_run_id(run_id)
        path = results_dir / run_id
        if (path / RUN_JSON).exists():
            raise CompoundError(
                f"run {run_id!r} already exists in {results_dir}; resume it or pick another run id"
            )
        if path.is_dir() and any(path.iterdir()):
            raise CompoundError(f"{path} exists and is not an empty run directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CompoundError(f"cannot create run directory {path}: {error.strerror}") from error
        meta = {
            "run_id": run_id,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "state": "running",
            "config": config,
            "environment": environment,
        }
        store = cls(path, meta)
        store._write_meta()
        store._done = set()
        return store

    @classmethod
    def open(cls, results_dir: Path, run_id: str) -> RunStore:
        """Reopen an existing run (for --resume); CompoundError when it is missing or broken."""
        results_dir = Path(results_dir)
        _check_run_id(run_id)
        path = results_dir / run_id
        if not path.is_dir():
            known = list_runs(results_dir)[-5:]
            hint = f" (latest runs there: {', '.join(known)})" if known else ""
            raise CompoundError(f"no run {run_id!r} in {results_dir}{hint}")
        meta_path = path / RUN_JSON
        if not meta_path.is_file():
            raise CompoundError(f"{path} has no {RUN_JSON}; it is not a run directory")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CompoundError(f"{meta_path} is not valid JSON: {error}") from error
        if not isinstance(meta, dict) or any(key not in meta for key in _META_KEYS):
            raise CompoundError(f"{meta_path} lacks the fields {', '.join(_META_KEYS)}")
        return cls(path, meta)

    # -- run.json -----------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of everything in run.json."""
        return copy.deepcopy(self._meta)

    @property
    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self._meta["config"])

    @property
    def samples_path(self) -> Path:
        return self.path / SAMPLES_JSONL

    def set_state(self, state: str) -> None:
        """Persist the run state, so a reader can tell a finished run from a cut-off one."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; expected one of {STATES}")
        self._meta["state"] = state
        self._meta["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        self._write_meta()

    def update_meta(self, key: str, value: Any) -> None:
        """Add or replace an extra run.json field (the core fields have their own setters)."""
        if key in _META_KEYS:
            raise ValueError(f"run.json field {key!r} cannot be changed with update_meta")
        self._meta[key] = value
        self._write_meta()

    def _write_meta(self) -> None:
        # Strict JSON for readers other than Python: NaN and infinity become null.
        text = json.dumps(json_safe(self._meta), indent=2, default=_json_default) + "\n"
        _atomic_write(self.path / RUN_JSON, text.encode("utf-8"))

    # -- samples.jsonl: writing ---------------------------------------------------------------

    def append_block(self, config_name: str, block: int, samples: list[Sample]) -> None:
        """Store one finished block: its samples and marker in one write, then fsync."""
        key = (config_name, int(block))
        for sample in samples:
            if (sample.config, sample.block) != key:
                raise ValueError(
                    f"sample of {sample.config!r} block {sample.block} given to block {key}"
                )
        done = self._completed()
        if key in done:
            raise ValueError(f"block {key} is already stored in run {self.run_id}")
        records = [{"kind": "sample", **sample.to_dict()} for sample in samples]
        config, index, n = key[0], key[1], len(samples)
        records.append({"kind": "block_done", "config": config, "block": index, "n_samples": n})
        self._append(records)
        done.add(key)

    def record_failure(self, config_name: str, error: str, block: int | None = None) -> None:
        """Log that a configuration (or one of its blocks) failed, so the report can say so."""
        self._append(
            [
                {
                    "kind": "failure",
                    "config": config_name,
                    "block": None if block is None else int(block),
                    "error": error,
                    "time": time.time(),
                }
            ]
        )

    def record_extra(self, kind: str, payload: dict[str, Any]) -> None:
        """Log another per-run record (e.g. a lossless-check rejection) as `{"kind": kind, ...}`."""
        if kind in _LOG_KINDS:
            raise ValueError(f"record kind {kind!r} is reserved for the store")
        if "kind" in payload:
            raise ValueError("an extra record's payload must not have a 'kind' key")
        self._append([{"kind": kind, **payload}])

    def _append(self, records: list[dict[str, Any]]) -> None:
        cut = _cut_partial_tail(self.samples_path)
        if cut:
            log.warning("cut %d bytes of a partly written line from %s", cut, self.samples_path)
        data = "".join(
            json.dumps(r, separators=(",", ":"), default=_json_default) + "\n" for r in records
        )
        with open(self.samples_path, "ab") as handle:
            handle.write(data.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())

    # -- samples.jsonl: reading ---------------------------------------------------------------

    def completed_blocks(self) -> set[tuple[str, int]]:
        """(config, block) pairs stored with their marker: the blocks a resume may skip."""
        return set(self._completed())

    def failures(self) -> list[dict[str, Any]]:
        """Failure records in the order they were logged."""
        return _read_log(self.samples_path).failures

    def extras(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Extra records (all, or those of one kind), each with its `kind` key."""
        records = _read_log(self.samples_path).extras
        return [r for r in records if kind is None or r["kind"] == kind]

    def samples_frame(self) -> pd.DataFrame:
        """Tidy frame, one row per sample of every completed block (first copy only)."""
        return _samples_frame(_read_log(self.samples_path).samples)

    def _completed(self) -> set[tuple[str, int]]:
        # Read once, then kept up to date by append_block: this process is the only writer.
        if self._done is None:
            self._done = set(_read_log(self.samples_path).done)
        return self._done

    # -- whole files --------------------------------------------------------------------------

    def write_summary(self, df: pd.DataFrame) -> None:
        """Write summary.csv; named index levels become columns so nothing is lost."""
        if any(name is not None for name in df.index.names):
            df = df.reset_index()
        _atomic_write(self.path / SUMMARY_CSV, df.to_csv(index=False).encode("utf-8"))

    def write_text(self, name: str, text: str) -> None:
        """Write a text file such as report.md into the run directory (atomic replace)."""
        if Path(name).name != name or name in _STORE_FILES or name in ("", ".", ".."):
            raise ValueError(f"{name!r} is not a file name the store lets you write")
        _atomic_write(self.path / name, text.encode("utf-8"))


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class _Log:
    samples: list[dict[str, Any]] = field(default_factory=list)
    done: list[tuple[str, int]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)


def _read_log(path: Path) -> _Log:
    """Parse samples.jsonl, keeping only samples that their block's marker vouches for."""
    records = _read_records(path)
    parsed = _Log()
    seen: set[tuple[str, int]] = set()
    for i, (_, record) in enumerate(records):
        kind = record["kind"]
        if kind == "block_done":
            key, window = _marker_window(path, records, i)
            if key not in seen:  # a block completed twice keeps its first copy
                seen.add(key)
                parsed.done.append(key)
                parsed.samples.extend(window)
        elif kind == "failure":
            parsed.failures.append({k: v for k, v in record.items() if k != "kind"})
        elif kind != "sample":  # samples count only through their marker
            parsed.extras.append(record)
    return parsed


def _read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs; a last line without its newline was cut off and is dropped."""
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CompoundError(f"{path} line {lineno} is not valid JSON ({error})") from error
        if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
            raise CompoundError(f"{path} line {lineno} is not a record with a 'kind'")
        records.append((lineno, record))
    return records


def _marker_window(
    path: Path, records: list[tuple[int, dict[str, Any]]], i: int
) -> tuple[tuple[str, int], list[dict[str, Any]]]:
    """The key of the marker at `i` and the sample records it vouches for (checked)."""
    lineno, marker = records[i]
    try:
        key = (str(marker["config"]), int(marker["block"]))
        n = int(marker["n_samples"])
    except (KeyError, TypeError, ValueError) as error:
        raise CompoundError(f"{path} line {lineno}: malformed block_done marker") from error
    window = [record for _, record in records[i - n : i]] if 0 < n <= i else []
    if len(window) != n or any(
        r["kind"] != "sample" or (r.get("config"), r.get("block")) != key for r in window
    ):
        raise CompoundError(
            f"{path} line {lineno}: the marker of {key[0]!r} block {key[1]} does not follow its "
            f"{n} samples; the file is corrupt"
        )
    samples = []
    for record in window:
        try:
            sample = Sample.from_dict({k: v for k, v in record.items() if k != "kind"})
        except (TypeError, ValueError) as error:
            raise CompoundError(f"{path}: bad sample in block {key} ({error})") from error
        samples.append(sample.to_dict())
    return key, samples


def _samples_frame(samples: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(samples, columns=list(SAMPLE_COLUMNS))
    return frame.astype(_SAMPLE_DTYPES)


def _failures_frame(failures: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(failures, columns=list(FAILURE_COLUMNS))
    return frame.astype({"config": "str", "block": "Int64", "error": "str", "time": "float64"})


def _cut_partial_tail(path: Path) -> int:
    """Drop the bytes after the last newline (a line cut by a kill); returns how many."""
    if not path.is_file():
        return 0
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        keep, end = 0, size
        while end > 0:
            start = max(0, end - _TAIL_CHUNK)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    return size - keep


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory and os.replace, so readers see old or new."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_run_id(run_id: str) -> None:
    if not _RUN_ID_RE.fullmatch(run_id):
        raise CompoundError(
            f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' (no '/')"
        )


def _json_default(value: Any) -> Any:
    """Let numpy values and paths from configs and trackers be stored as plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store a {type(value).__name__} as JSON")
