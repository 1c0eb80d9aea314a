"""The interleaved runner: one worker per configuration, blocks in a shuffled order each round.

Round r runs one block of every live configuration, in an order drawn from (seed, r), so drift
hits all configurations alike and a resumed run replays the same order. Each finished block is
in samples.jsonl before the next starts, so a killed run loses at most the block in flight.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import numpy as np

from bench.configuration import RunSpec
from bench.measure.worker import worker_main
from bench.store import RunStore
from core.samples import Sample

BLOCK_TIMEOUT_S = 1800.0  # one block of a cost-only 7B shape on a CPU can be slow, never this slow


@dataclass
class _Live:
    name: str
    process: BaseProcess
    conn: Connection


@dataclass
class RunOutcome:
    rounds: int
    failed: dict[str, str] = field(default_factory=dict)
    stopped_by_budget: bool = False


ProgressFn = Callable[[str], None]


def round_order(names: list[str], seed: int, round_index: int) -> list[str]:
    rng = np.random.default_rng([seed, round_index])
    return [names[i] for i in rng.permutation(len(names))]


def _receive(live: _Live, timeout: float) -> tuple:
    if not live.conn.poll(timeout):
        raise TimeoutError(f"no answer within {timeout:.0f} s")
    try:
        return live.conn.recv()
    except (EOFError, ConnectionResetError):
        live.process.join(5)
        code = live.process.exitcode
        reason = "killed (out of memory?)" if code in (-9, 137) else f"exit code {code}"
        raise RuntimeError(f"worker process died: {reason}") from None


def _start(spec: RunSpec, index: int) -> _Live:
    """Start one worker. It inherits SIGINT ignored (a disposition kept across exec), so a
    Ctrl-C in the terminal reaches only the parent, which stops the workers quietly."""
    context = mp.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=worker_main, args=(child, spec.to_dict(), index), daemon=True)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    child.close()
    return _Live(spec.configurations[index].name, process, parent)


def _stop(live: _Live) -> None:
    try:
        live.conn.send(("stop",))
    except (BrokenPipeError, OSError):
        pass
    live.process.join(10)
    if live.process.is_alive():
        live.process.kill()
        live.process.join()


def _timed_seconds(store: RunStore) -> dict[str, float]:
    frame = store.samples_frame()
    blocks = frame[frame.metric == "block_seconds"]
    return blocks.groupby("config")["value"].sum().to_dict()


def _failed_configs(store: RunStore) -> dict[str, str]:
    return {f["config"]: f["error"] for f in store.failures()}


def run_rounds(spec: RunSpec, store: RunStore, progress: ProgressFn | None = None) -> RunOutcome:
    """Start workers one at a time (cold starts must not overlap), then run rounds until done."""
    say = progress or (lambda _message: None)
    failed = _failed_configs(store)
    completed = store.completed_blocks()
    live: dict[str, _Live] = {}
    try:
        for index, configuration in enumerate(spec.configurations):
            name = configuration.name
            if name in failed:
                continue
            say(f"starting {name}")
            worker = _start(spec, index)
            try:
                message = _receive(worker, BLOCK_TIMEOUT_S)
            except (TimeoutError, RuntimeError) as error:
                message = ("error", str(error), "")
            if message[0] == "error":
                store.record_failure(name, message[1], None, detail=message[2])
                failed[name] = message[1]
                say(f"{name} failed to start: {message[1]}")
                _stop(worker)
                continue
            if (name, -1) not in completed:
                store.append_block(name, -1, [Sample.from_dict(s) for s in message[1]])
            live[name] = worker
        return _rounds(spec, store, live, failed, say)
    finally:
        for worker in live.values():
            _stop(worker)


def _rounds(
    spec: RunSpec, store: RunStore, live: dict[str, _Live], failed: dict[str, str], say: ProgressFn
) -> RunOutcome:
    protocol = spec.protocol
    names = [c.name for c in spec.configurations]
    completed = store.completed_blocks()
    timed = _timed_seconds(store)
    budget_start = time.perf_counter()
    round_index = 0
    stopped_by_budget = False
    while live:
        active = [n for n in names if n in live]
        done_rounds = round_index >= protocol.min_rounds
        done_seconds = all(timed.get(n, 0.0) >= protocol.min_seconds for n in active)
        if done_rounds and done_seconds:
            break
        if (
            protocol.max_seconds is not None
            and time.perf_counter() - budget_start > protocol.max_seconds
        ):
            stopped_by_budget = True
            break
        for name in round_order(names, protocol.seed, round_index):
            if name not in live or (name, round_index) in completed:
                continue
            worker = live[name]
            try:
                worker.conn.send(("block", round_index))
                message = _receive(worker, BLOCK_TIMEOUT_S)
            except (TimeoutError, RuntimeError, BrokenPipeError, OSError) as error:
                message = ("error", str(error), "")
            if message[0] == "error":
                store.record_failure(name, message[1], round_index, detail=message[2])
                failed[name] = message[1]
                say(f"{name} failed in round {round_index}: {message[1]}")
                _stop(live.pop(name))
                continue
            samples = [Sample.from_dict(s) for s in message[1]]
            store.append_block(name, round_index, samples)
            timed[name] = timed.get(name, 0.0) + next(
                s.value for s in samples if s.metric == "block_seconds"
            )
        least = min((timed.get(n, 0.0) for n in live), default=0.0)
        say(
            f"round {round_index + 1} (min {protocol.min_rounds}); timed {least:.0f}/"
            f"{protocol.min_seconds:.0f} s per configuration; "
            f"{time.perf_counter() - budget_start:.0f} s elapsed"
        )
        round_index += 1
    return RunOutcome(rounds=round_index, failed=failed, stopped_by_budget=stopped_by_budget)
