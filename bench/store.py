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
- `errors.log`: multi-line error details (a worker's traceback) that one-line messages point to.
- `summary.csv`, `report.md`: written whole by the analysis and report (atomic replace).
- `writer.lock`: the writer's PID, under an exclusive `flock` held while it writes.

Only the parent (runner) process writes; workers send their samples back to it. The lock makes
sure of one writer per run: a second `compound run` with the same run id, or a resume of a live
run, is refused instead of storing every block twice. The OS drops the lock when the writer
exits or is killed, so a crash never leaves a run locked.
"""

from __future__ import annotations

import copy
import fcntl
import gzip
import json
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd

from core.errors import CompoundError
from core.jsonio import json_safe
from core.samples import Sample

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
SAMPLES_JSONL = "samples.jsonl"
SUMMARY_CSV = "summary.csv"
ERRORS_LOG = "errors.log"
LOCK_FILE = "writer.lock"
MAX_RUN_ID_LENGTH = 100

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

_META_TYPES: dict[str, type] = {
    "run_id": str,
    "created": str,
    "state": str,
    "config": dict,
    "environment": dict,
}
_LOG_KINDS = ("sample", "block_done", "failure")
_STORE_FILES = (RUN_JSON, SAMPLES_JSONL, ERRORS_LOG, LOCK_FILE)
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
_PID_WAIT_S = 0.2  # a writer that just took the lock may not have written its PID yet


def new_run_id() -> str:
    """A run id that sorts by creation time (UTC, to the second) with a random suffix."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def check_run_id(run_id: str) -> None:
    """CompoundError unless `run_id` can name a run directory (checkable before any work)."""
    if not run_id:
        raise CompoundError("the run id is empty; name it with letters, digits, '.', '_' and '-'")
    if len(run_id) > MAX_RUN_ID_LENGTH:
        raise CompoundError(
            f"run id {run_id[:20]!r}... is {len(run_id)} characters long; "
            f"use at most {MAX_RUN_ID_LENGTH}"
        )
    if not _RUN_ID_RE.fullmatch(run_id):
        raise CompoundError(
            f"invalid run id {run_id!r}: use letters, digits, '.', '_' and '-' (no '/')"
        )


def resolve_run(reference: str, results_dir: Path) -> Path:
    """A run directory from a path to one, or from a run id under `results_dir`."""
    given = Path(reference).expanduser()
    for candidate in (given, Path(results_dir) / reference):
        if (candidate / RUN_JSON).is_file():
            return candidate
    if given.is_dir():
        raise CompoundError(f"{given} has no {RUN_JSON}; it is not a run directory")
    known = list_runs(results_dir)[-5:]
    hint = f" (latest runs there: {', '.join(known)})" if known else ""
    raise CompoundError(
        f"no run {reference!r}: not a run directory, nor a run id in {results_dir}{hint}"
    )


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
    """Writer or reader of one run directory; build it with `create` or `open`.

    A writer holds the run's lock until `close()` (or the end of a `with` block, or the process);
    a reader takes no lock and may not change anything.
    """

    def __init__(self, path: Path, meta: dict[str, Any], lock: BinaryIO | None = None) -> None:
        self.path = Path(path)
        self._meta = meta
        self._lock = lock
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
        """Start a new run and hold its lock; refuses a directory that already holds run data."""
        results_dir = Path(results_dir)
        if run_id is None:
            run_id = new_run_id()
            while (results_dir / run_id).exists():
                run_id = new_run_id()
        check_run_id(run_id)
        path = results_dir / run_id
        try:
            path.mkdir(parents=True, exist_ok=True)
            names = {p.name for p in path.iterdir()}
        except OSError as error:
            raise CompoundError(f"cannot create run directory {path}: {error.strerror}") from error
        if names - {LOCK_FILE} and not names & {LOCK_FILE, RUN_JSON}:
            # Someone else's files: refuse before leaving a lock file among them.
            raise CompoundError(f"{path} exists and is not an empty run directory")
        lock = _take_lock(path, "wait for it or pick another --run-id")
        try:
            if (path / RUN_JSON).exists():
                raise CompoundError(
                    f"run {run_id!r} already exists in {results_dir}; "
                    "resume it or pick another run id"
                )
            if any(p.name != LOCK_FILE for p in path.iterdir()):
                raise CompoundError(f"{path} exists and is not an empty run directory")
            meta = {
                "run_id": run_id,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "state": "running",
                "config": config,
                "environment": environment,
            }
            store = cls(path, meta, lock)
            store._write_meta()
        except BaseException:
            lock.close()
            raise
        store._done = set()
        return store

    @classmethod
    def open(cls, results_dir: Path, run_id: str, *, writer: bool = False) -> RunStore:
        """Reopen an existing run: read-only, or with `writer=True` holding its lock (resume).

        CompoundError when the run is missing, broken, or (writer) being written by another process.
        """
        results_dir = Path(results_dir)
        check_run_id(run_id)
        path = results_dir / run_id
        if not path.is_dir():
            known = list_runs(results_dir)[-5:]
            hint = f" (latest runs there: {', '.join(known)})" if known else ""
            raise CompoundError(f"no run {run_id!r} in {results_dir}{hint}")
        meta_path = path / RUN_JSON
        if not meta_path.is_file():
            raise CompoundError(f"{path} has no {RUN_JSON}; it is not a run directory")
        _check_run_files(path)
        meta = _read_meta(meta_path)  # a broken run is refused before its lock file is made
        if not writer:
            return cls(path, meta, None)
        lock = _take_lock(path, "wait for it to finish or stop it first")
        try:
            return cls(path, _read_meta(meta_path), lock)  # as the last writer left it
        except BaseException:
            lock.close()
            raise

    def close(self) -> None:
        """Give up the lock (a writer then becomes read-only); calling it again does nothing."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()  # closing the only descriptor of the lock file releases the flock

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require_writer(self) -> None:
        if self._lock is None:
            raise RuntimeError(
                f"run {self.run_id!r} is open read-only (or closed); "
                "use RunStore.open(..., writer=True) to change it"
            )

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

    @property
    def errors_path(self) -> Path:
        """errors.log, for messages that point the user to an error's details."""
        return self.path / ERRORS_LOG

    def set_state(self, state: str) -> None:
        """Persist the run state, so a reader can tell a finished run from a cut-off one."""
        self._require_writer()
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; expected one of {STATES}")
        self._meta["state"] = state
        self._meta["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        self._write_meta()

    def update_meta(self, key: str, value: Any) -> None:
        """Add or replace an extra run.json field (the core fields have their own setters)."""
        self._require_writer()
        if key in _META_TYPES:
            raise ValueError(f"run.json field {key!r} cannot be changed with update_meta")
        self._meta[key] = value
        self._write_meta()

    def _write_meta(self) -> None:
        # Strict JSON for readers other than Python: NaN and infinity become null.
        text = json.dumps(json_safe(self._meta), indent=2, default=_json_default) + "\n"
        _atomic_write(self.path / RUN_JSON, text.encode("utf-8"))

    # -- samples.jsonl and errors.log: writing ------------------------------------------------

    def append_block(self, config_name: str, block: int, samples: list[Sample]) -> None:
        """Store one finished block: its samples and marker in one write, then fsync."""
        self._require_writer()
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

    def record_failure(
        self, config_name: str, error: str, block: int | None = None, detail: str | None = None
    ) -> None:
        """Log that a configuration (or one of its blocks) failed, so the report can say so.

        `error` is the one-line record; a multi-line `detail` (a traceback) goes to errors.log.
        """
        self._require_writer()
        if detail and detail.strip():
            where = config_name if block is None else f"{config_name} block {block}"
            self.log_error(f"{where}: {error}", detail)
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

    def log_error(self, title: str, detail: str) -> None:
        """Append an error's details to errors.log, under a timestamped one-line title."""
        self._require_writer()
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        text = f"--- {stamp} {' '.join(title.split())}\n{detail.rstrip()}\n\n"
        with open(self.errors_path, "a", encoding="utf-8", errors="backslashreplace") as handle:
            handle.write(text)

    def record_extra(self, kind: str, payload: dict[str, Any]) -> None:
        """Log another per-run record (e.g. a lossless-check rejection) as `{"kind": kind, ...}`."""
        self._require_writer()
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

    def repair(self) -> dict[str, Any]:
        """Rewrite a damaged samples.jsonl keeping every record and block that is intact.

        Drops unreadable lines, samples no valid marker vouches for, and markers whose samples
        are damaged; the blocks dropped are then missing, so a resume runs them again. The
        original is kept as `samples.jsonl.damaged-<UTC time>`. Returns what it did, in counts.
        """
        self._require_writer()
        path = self.samples_path
        if not path.is_file():
            return {"lines_dropped": 0, "blocks_kept": 0, "blocks_dropped": 0, "backup": None}
        data = path.read_bytes()
        lines, tail = _scan(data)
        keep = [line.record is not None for line in lines]
        vouched: set[int] = set()
        kept: set[tuple[str, int]] = set()
        lost: set[tuple[str, int]] = set()
        for i, line in enumerate(lines):
            if line.record is None or line.record["kind"] != "block_done":
                continue
            try:
                key, samples = _vouched(lines, i)
            except _Broken as broken:
                keep[i] = False
                if broken.key is not None:
                    lost.add(broken.key)
                continue
            kept.add(key)
            vouched.update(range(i - len(samples), i))
        for i, line in enumerate(lines):
            if line.record is not None and line.record["kind"] == "sample" and i not in vouched:
                keep[i] = False
                config, block = line.record.get("config"), line.record.get("block")
                if isinstance(config, str) and isinstance(block, int):
                    lost.add((config, block))
        repaired = b"".join(line.raw + b"\n" for line, ok in zip(lines, keep, strict=True) if ok)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        backup = path.with_name(f"{SAMPLES_JSONL}.damaged-{stamp}")
        suffix = 1
        while backup.exists():
            backup = path.with_name(f"{SAMPLES_JSONL}.damaged-{stamp}-{suffix}")
            suffix += 1
        mode = path.stat().st_mode
        _atomic_write(backup, data, mode)
        if repaired != data:
            _atomic_write(path, repaired, mode)
        self._done = None
        return {
            "lines_dropped": keep.count(False) + (1 if tail.strip() else 0),
            "blocks_kept": len(kept),
            "blocks_dropped": len(lost - kept),
            "backup": str(backup),
        }

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
        # A writer reads once, then append_block keeps it up to date: the lock makes it the only
        # writer. A reader reads afresh, as a live writer may be adding blocks.
        if self._done is None or self._lock is None:
            self._done = set(_read_log(self.samples_path).done)
        return self._done

    # -- whole files --------------------------------------------------------------------------

    def write_summary(self, df: pd.DataFrame) -> None:
        """Write summary.csv; named index levels become columns so nothing is lost."""
        self._require_writer()
        if any(name is not None for name in df.index.names):
            df = df.reset_index()
        _atomic_write(self.path / SUMMARY_CSV, df.to_csv(index=False).encode("utf-8"))

    def write_text(self, name: str, text: str) -> None:
        """Write a text file such as report.md into the run directory (atomic replace)."""
        self.write_bytes(name, text.encode("utf-8"))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a file such as a picture into the run directory (atomic replace)."""
        self._require_writer()
        if (
            Path(name).name != name
            or name in _STORE_FILES
            or name.startswith(SAMPLES_JSONL)  # the backups of repair
            or name in ("", ".", "..")
        ):
            raise ValueError(f"{name!r} is not a file name the store lets you write")
        _atomic_write(self.path / name, data)


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class _Log:
    samples: list[dict[str, Any]] = field(default_factory=list)
    done: list[tuple[str, int]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Line:
    """One non-blank, newline-terminated line of samples.jsonl; `record` is None when damaged."""

    lineno: int
    raw: bytes
    record: dict[str, Any] | None
    problem: str = ""


class _Broken(ValueError):
    """A block_done marker that does not vouch for intact samples; `key` when it is readable."""

    def __init__(self, message: str, key: tuple[str, int] | None = None) -> None:
        super().__init__(message)
        self.key = key


def _log_bytes(path: Path) -> bytes:
    """samples.jsonl, or its gzipped copy (curated runs keep `samples.jsonl.gz` only)."""
    if path.is_file():
        return path.read_bytes()
    packed = path.with_name(path.name + ".gz")
    if packed.is_file():
        try:
            return gzip.decompress(packed.read_bytes())
        except (OSError, EOFError) as error:
            raise CompoundError(f"{packed} cannot be decompressed ({error})") from None
    return b""


def _read_log(path: Path) -> _Log:
    """Parse samples.jsonl, keeping only samples that their block's marker vouches for."""
    lines, _ = _scan(_log_bytes(path))
    for line in lines:
        if line.record is None:
            raise _damaged(path, f"line {line.lineno} {line.problem}")
    parsed = _Log()
    seen: set[tuple[str, int]] = set()
    for i, line in enumerate(lines):
        record = line.record
        assert record is not None  # checked above
        kind = record["kind"]
        if kind == "block_done":
            try:
                key, window = _vouched(lines, i)
            except _Broken as broken:
                raise _damaged(path, f"line {line.lineno}: {broken}") from broken
            if key not in seen:  # a block completed twice keeps its first copy
                seen.add(key)
                parsed.done.append(key)
                parsed.samples.extend(window)
        elif kind == "failure":
            parsed.failures.append({k: v for k, v in record.items() if k != "kind"})
        elif kind != "sample":  # samples count only through their marker
            parsed.extras.append(record)
    return parsed


def _scan(data: bytes) -> tuple[list[_Line], bytes]:
    """The lines of a samples.jsonl, and the tail after its last newline (cut off by a kill)."""
    *complete, tail = data.split(b"\n")
    lines = []
    for lineno, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            lines.append(_Line(lineno, raw, None, "is not valid JSON"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
            lines.append(_Line(lineno, raw, None, "is not a record with a 'kind'"))
            continue
        lines.append(_Line(lineno, raw, record))
    return lines, tail


def _vouched(lines: list[_Line], i: int) -> tuple[tuple[str, int], list[dict[str, Any]]]:
    """The key of the marker at `i` and the samples it vouches for; _Broken when they don't hold.

    The window counts damaged lines too, so a marker never vouches for samples that are not
    exactly the ones written right before it.
    """
    marker = lines[i].record
    assert marker is not None
    try:
        key = (str(marker["config"]), int(marker["block"]))
        n = int(marker["n_samples"])
    except (KeyError, TypeError, ValueError) as error:
        raise _Broken("malformed block_done marker") from error
    window = [line.record for line in lines[i - n : i]] if 0 <= n <= i else []
    if len(window) != n or any(
        r is None or r["kind"] != "sample" or (r.get("config"), r.get("block")) != key
        for r in window
    ):
        raise _Broken(
            f"the marker of {key[0]!r} block {key[1]} does not follow its {n} samples", key
        )
    samples = []
    for record in window:
        assert record is not None
        try:
            sample = Sample.from_dict({k: v for k, v in record.items() if k != "kind"})
        except (TypeError, ValueError) as error:
            raise _Broken(f"bad sample in block {key} ({error})", key) from error
        samples.append(sample.to_dict())
    return key, samples


def _damaged(path: Path, what: str) -> CompoundError:
    return CompoundError(
        f"{path} {what}; `compound run --resume {path.parent.name} --repair` drops the damaged "
        "lines and re-runs the blocks they belonged to"
    )


def _read_meta(meta_path: Path) -> dict[str, Any]:
    """run.json, checked: every core field there with its type, and a known state."""
    advice = "restore it or start a new run"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CompoundError(f"{meta_path} is not valid JSON ({error}); {advice}") from error
    if not isinstance(meta, dict):
        raise CompoundError(f"{meta_path} is not a JSON object; {advice}")
    missing = [key for key in _META_TYPES if key not in meta]
    if missing:
        fields = "field" if len(missing) == 1 else "fields"
        raise CompoundError(f"{meta_path} lacks the {fields} {', '.join(missing)}; {advice}")
    for key, kind in _META_TYPES.items():
        if not isinstance(meta[key], kind):
            got = "null" if meta[key] is None else type(meta[key]).__name__
            expected = "an object" if kind is dict else kind.__name__
            raise CompoundError(f"{meta_path}: {key} must be {expected}, got {got}; {advice}")
    if meta["state"] not in STATES:
        raise CompoundError(
            f"{meta_path}: state must be one of {', '.join(STATES)}, got {meta['state']!r}; "
            f"{advice}"
        )
    return meta


def _check_run_files(path: Path) -> None:
    """The run's own files must be regular files (or absent): a FIFO would block a read forever,
    and a directory or a link loop would fail only after the run's state had changed."""
    for name in (RUN_JSON, SAMPLES_JSONL, LOCK_FILE, ERRORS_LOG):
        target = path / name
        if not os.path.lexists(target):
            continue
        try:
            regular = stat.S_ISREG(os.stat(target).st_mode)
        except OSError as error:
            raise CompoundError(
                f"{target} cannot be read ({error.strerror}); restore it or start a new run"
            ) from None
        if not regular:
            raise CompoundError(f"{target} is not a regular file; restore it or start a new run")


def live_writer(path: Path) -> str | None:
    """'process <PID>' when a process holds the run's lock now, else None (reads only)."""
    lock_path = path / LOCK_FILE
    if not lock_path.is_file():
        return None
    try:
        handle = open(lock_path, "rb")  # noqa: SIM115 (closed below, after the probe)
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_holder(handle)
        except OSError:
            return None
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _take_lock(path: Path, advice: str) -> BinaryIO:
    """Hold the run's exclusive lock, with our PID in the lock file; CompoundError when taken.

    The descriptor is close-on-exec, so spawned workers never hold the lock.
    """
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise CompoundError(f"cannot open {lock_path}: {error.strerror}") from error
    handle = os.fdopen(fd, "r+b", buffering=0)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(handle)
        handle.close()
        raise CompoundError(
            f"run {path.name!r} in {path.parent} is being written by {holder} (still running); "
            f"{advice}"
        ) from None
    except OSError as error:
        handle.close()
        raise CompoundError(
            f"cannot lock {lock_path}: {error.strerror}; keep results on a local disk"
        ) from error
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n".encode())
    return handle


def _lock_holder(handle: BinaryIO) -> str:
    """'process <PID>' from a lock file someone else holds (waiting briefly for the PID)."""
    deadline = time.monotonic() + _PID_WAIT_S
    while True:
        handle.seek(0)
        text = handle.read().decode("ascii", errors="replace").strip()
        if text.isdigit():
            return f"process {text}"
        if time.monotonic() > deadline:
            return "another process"
        time.sleep(0.01)


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


def _atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write via a temp file in the same directory and os.replace, so readers see old or new."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), stat.S_IMODE(mode))
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    """Let numpy values and paths from configs and trackers be stored as plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store a {type(value).__name__} as JSON")
