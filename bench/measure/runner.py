"""The interleaved runner: replicated worker processes, blocks in a shuffled order each round.

The run is split into epochs; in each, one worker per configuration starts (in a random
order), and round r runs one block of every live configuration, in an order drawn from
(seed, r), so drift hits all configurations alike and a resumed run replays the same order.
Between epochs every worker is replaced: each configuration is measured in several processes,
so the offset a process carries is measured, not mistaken for an effect. Each finished block
is in samples.jsonl before the next starts (labelled with its epoch), so a killed run loses
at most the block in flight.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import numpy as np
import pandas as pd

from bench.configuration import Protocol, RunSpec
from bench.measure.worker import COLD as COLD_BLOCK
from bench.measure.worker import worker_main
from bench.store import RunStore
from core.samples import MEMORY_BLOCK, MEMORY_PASS, PASS_KEY, PROCESS_KEY, Sample, process_of

BLOCK_TIMEOUT_S = 1800.0  # one block of a cost-only 7B shape on a CPU can be slow, never this slow


@dataclass
class _Live:
    """One worker process and the configurations it holds (one, unless co-resident)."""

    names: list[str]
    process: BaseProcess
    conn: Connection


@dataclass
class RunOutcome:
    rounds: int
    failed: dict[str, str] = field(default_factory=dict)
    stopped_by_budget: bool = False
    decided: str | None = None  # why a sequential rule stopped the run early


ProgressFn = Callable[[str], None]
DecidedFn = Callable[[int], str | None]  # epochs complete → why to stop now, or None


def round_order(names: list[str], seed: int, round_index: int) -> list[str]:
    rng = np.random.default_rng([seed, round_index])
    return [names[i] for i in rng.permutation(len(names))]


def _died(live: _Live) -> RuntimeError:
    live.process.join(5)
    code = live.process.exitcode
    reason = "killed (out of memory?)" if code in (-9, 137) else f"exit code {code}"
    return RuntimeError(f"worker process died: {reason}")


def _receive(live: _Live, timeout: float) -> tuple:
    if not live.conn.poll(timeout):
        raise TimeoutError(f"no answer within {timeout:.0f} s")
    try:
        return live.conn.recv()
    except (EOFError, ConnectionResetError):
        raise _died(live) from None


def _ask(live: _Live, message: tuple, timeout: float) -> tuple:
    """Send one command and wait for the answer. A worker that died shows up as a broken pipe
    on the send or an end of file on the receive, whichever comes first: both say it died."""
    try:
        live.conn.send(message)
    except (BrokenPipeError, ConnectionResetError):
        raise _died(live) from None
    return _receive(live, timeout)


# Imported once by the fork server, so a worker forked from it starts without importing them.
FORKSERVER_PRELOAD = ["torch", "transformers", "bench.measure.worker"]


def _start(spec: RunSpec, names: list[str], idle_watts: float | None = None) -> _Live:
    """Start one worker process holding the configurations `names`, loaded in that order.

    It inherits SIGINT ignored (a disposition kept across exec, and the fork server started
    here keeps it for its children), so a Ctrl-C in the terminal reaches only the parent,
    which stops the workers quietly.

    `forkserver` forks each worker from a server that imported torch once (about 1 s per
    worker on 2 cores, against about 7 s for `spawn`, which imports everything anew).
    """
    method = spec.protocol.start_method
    if method == "forkserver":
        mp.set_forkserver_preload(FORKSERVER_PRELOAD)
    context = mp.get_context(method)
    parent, child = context.Pipe()
    index = {c.name: i for i, c in enumerate(spec.configurations)}
    process = context.Process(
        target=worker_main,
        args=(child, spec.to_dict(), [index[n] for n in names], idle_watts),
        daemon=True,
    )
    # Blocked first, so a Ctrl-C that comes while the worker starts stays pending (Linux keeps
    # a blocked signal pending even while it is ignored) and reaches the parent once the
    # handler is back, instead of being lost with the run going on.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    child.close()
    return _Live(list(names), process, parent)


def _stop(live: _Live) -> None:
    try:
        live.conn.send(("stop",))
    except (BrokenPipeError, OSError):
        pass
    live.process.join(10)
    if live.process.is_alive():
        live.process.kill()
        live.process.join()


def _stored_rounds(store: RunStore) -> pd.DataFrame:
    """One row per stored timed block: config, round, epoch and its timed seconds."""
    frame = store.samples_frame()
    blocks = frame[(frame.metric == "block_seconds") & (frame.block >= 0)]
    epochs = [process_of(extra) for extra in blocks["extra"]]
    rows = pd.DataFrame(
        {
            "config": blocks["config"].to_numpy(),
            "round": blocks["block"].astype(int).to_numpy(),
            "epoch": epochs,
            "seconds": blocks["value"].astype(float).to_numpy(),
        }
    )
    # A block served at several batch sizes has one block_seconds per size: one round.
    return rows.groupby(["config", "round", "epoch"], as_index=False)["seconds"].sum()


def _failed_configs(store: RunStore) -> dict[str, str]:
    return {f["config"]: f["error"] for f in store.failures()}


def start_order(names: list[str], seed: int, epoch: int) -> list[str]:
    """The order workers start in `epoch`: random, so no configuration always starts first."""
    rng = np.random.default_rng([seed, epoch, 1])
    return [names[i] for i in rng.permutation(len(names))]


def alive_groups(names: list[str], max_alive: int, seed: int, epoch: int) -> list[list[str]]:
    """The epoch's configurations in groups of at most `max_alive` (0: all in one group),
    drawn in a random order per epoch, so no pair is always split or always together."""
    if max_alive <= 0 or max_alive >= len(names):
        return [names]
    ordered = start_order(names, seed, epoch + 1_000_003)
    return [ordered[i : i + max_alive] for i in range(0, len(ordered), max_alive)]


@dataclass
class _Progress:
    """What is stored so far: per configuration, rounds and timed seconds in each epoch."""

    rounds: pd.DataFrame

    def done(self, name: str, epoch: int) -> tuple[int, float]:
        rows = self.rounds[(self.rounds.config == name) & (self.rounds.epoch == epoch)]
        return len(rows), float(rows.seconds.sum())

    def add(self, name: str, round_index: int, epoch: int, seconds: float) -> None:
        row = pd.DataFrame(
            [{"config": name, "round": round_index, "epoch": epoch, "seconds": seconds}]
        )
        self.rounds = pd.concat([self.rounds, row], ignore_index=True)

    def next_round(self) -> int:
        return int(self.rounds["round"].max()) + 1 if len(self.rounds) else 0


def process_groups(names: list[str], placement: str, seed: int, epoch: int) -> list[list[str]]:
    """Which configurations share a worker process in `epoch`, in the order they start (or
    load): each alone (`isolated`), or all in one process (`coresident`); random per epoch."""
    ordered = start_order(names, seed, epoch)
    return [ordered] if placement == "coresident" else [[name] for name in ordered]


def run_rounds(
    spec: RunSpec,
    store: RunStore,
    progress: ProgressFn | None = None,
    decided: DecidedFn | None = None,
) -> RunOutcome:
    """Measure every configuration in `protocol.processes` epochs, then stop.

    In each epoch the configurations' workers start (one process at a time, in a random
    order: cold starts must not overlap), rounds run until the epoch's share of the minima is
    met, and all workers stop. A resumed run continues the epoch it was in with fresh workers.
    With `max_alive` set (memory allows fewer workers than configurations), an epoch runs its
    configurations in groups of at most that many, one group after another, on the same
    round numbers: rounds still pair by number, but a pair from two groups was measured at
    different times of the same epoch. A co-resident process that dies takes its other
    configurations with it: they start again in a fresh process and go on.

    `decided`, asked after every complete epoch, may end the run early (a sequential rule):
    it returns why, or None to go on.
    """
    say = progress or (lambda _message: None)
    protocol = spec.protocol
    names = [c.name for c in spec.configurations]
    failed = _failed_configs(store)
    state = _Progress(_stored_rounds(store))
    rounds_each = math.ceil(protocol.min_rounds / protocol.processes)
    seconds_each = protocol.min_seconds / protocol.processes
    budget_start = time.perf_counter()
    outcome = RunOutcome(rounds=0, failed=failed)
    if protocol.placement == "coresident":
        memory_pass(spec, store, failed, say)
    for epoch in range(protocol.processes):

        def epoch_done(name: str, epoch: int = epoch) -> bool:
            rounds, seconds = state.done(name, epoch)
            return rounds >= rounds_each and seconds >= seconds_each

        todo = [n for n in names if n not in failed and not epoch_done(n)]
        for group in alive_groups(todo, protocol.max_alive, protocol.seed, epoch):
            outcome.stopped_by_budget = _run_group(
                spec, store, group, epoch, epoch_done, state, failed, budget_start, say
            )
            if outcome.stopped_by_budget:
                break
        if outcome.stopped_by_budget:
            break
        if decided is not None and epoch + 1 < protocol.processes:
            outcome.decided = decided(epoch + 1)
            if outcome.decided:
                say(f"stopping after {epoch + 1} processes: {outcome.decided}")
                break
    outcome.rounds = int(state.rounds["round"].nunique()) if len(state.rounds) else 0
    return outcome


def _run_group(
    spec: RunSpec,
    store: RunStore,
    group: list[str],
    epoch: int,
    epoch_done: Callable[[str], bool],
    state: _Progress,
    failed: dict[str, str],
    budget_start: float,
    say: ProgressFn,
) -> bool:
    """One alive group's rounds in `epoch`; True if the budget stopped them. Configurations a
    dying co-resident process took with it are started again, in a fresh process."""
    while True:
        todo = [n for n in group if n not in failed and not epoch_done(n)]
        if not todo:
            return False
        if _over_budget(spec.protocol, budget_start):
            return True
        live = _start_epoch(spec, store, todo, epoch, failed, say)
        if not live:
            return False
        try:
            stopped = _epoch_rounds(
                spec, store, live, epoch, epoch_done, state, failed, budget_start, say
            )
        finally:
            for worker in _processes(live):
                _stop(worker)
        if stopped:
            return True


MEMORY_ORDER = 1_000_000  # start orders of the memory pass: apart from the timed epochs'
# What the isolated memory pass keeps of a block: the figures fixed by the process.
MEMORY_METRICS = frozenset(
    {
        "peak_rss_bytes",
        "rss_bytes",
        "param_bytes",
        "buffer_bytes",
        "peak_allocated_bytes",
        "peak_reserved_bytes",
        "nvml_process_bytes",
    }
)


def memory_pass(spec: RunSpec, store: RunStore, failed: dict[str, str], say: ProgressFn) -> None:
    """Each configuration alone in `memory_processes` fresh processes, one block each, its
    memory figures kept (block MEMORY_BLOCK − m, marked as the memory pass): what a
    co-resident run gives up, since its processes hold every configuration at once. A
    configuration that fails here fails for the run, as it would have in its own process."""
    names = [c.name for c in spec.configurations]
    for m in range(spec.protocol.memory_processes):
        block = MEMORY_BLOCK - m
        completed = store.completed_blocks()
        for name in start_order(names, spec.protocol.seed, MEMORY_ORDER + m):
            if name in failed or (name, block) in completed:
                continue
            say(f"memory pass {m + 1}/{spec.protocol.memory_processes}: {name} alone")
            worker = _start(spec, [name], idle_watts(store))
            try:
                message = _receive(worker, BLOCK_TIMEOUT_S)
                if message[0] == "ready" and name in message[1]:
                    message = _ask(worker, ("block", name, block), BLOCK_TIMEOUT_S)
                elif message[0] == "ready":
                    message = ("error", *message[2][name])
            except (TimeoutError, RuntimeError, BrokenPipeError, OSError) as error:
                message = ("error", str(error), "")
            finally:
                _stop(worker)
            if message[0] == "error":
                store.record_failure(name, message[1], block, detail=message[2])
                failed[name] = message[1]
                say(f"{name} failed in the memory pass: {message[1]}")
                continue
            kept = [Sample.from_dict(d) for d in message[1] if d["metric"] in MEMORY_METRICS]
            for sample in _labelled(kept, m, block):
                sample.extra[PASS_KEY] = MEMORY_PASS
            store.append_block(name, block, kept)


def _processes(live: dict[str, _Live]) -> list[_Live]:
    """Each live worker process once (co-resident configurations share one)."""
    return list({id(worker): worker for worker in live.values()}.values())


def _over_budget(protocol: Protocol, budget_start: float) -> bool:
    return (
        protocol.max_seconds is not None
        and time.perf_counter() - budget_start > protocol.max_seconds
    )


def _start_epoch(
    spec: RunSpec,
    store: RunStore,
    names: list[str],
    epoch: int,
    failed: dict[str, str],
    say: ProgressFn,
) -> dict[str, _Live]:
    """Start this epoch's worker processes (one per configuration, or one for all when they
    are co-resident); each configuration's cold records are stored as block −1 − epoch."""
    protocol = spec.protocol
    completed = store.completed_blocks()
    live: dict[str, _Live] = {}
    try:
        for group in process_groups(names, protocol.placement, protocol.seed, epoch):
            say(f"process {epoch + 1}/{protocol.processes}: starting {', '.join(group)}")
            started = time.perf_counter()
            worker = _start(spec, group, idle_watts(store))
            try:
                message = _receive(worker, BLOCK_TIMEOUT_S * len(group))
            except (TimeoutError, RuntimeError) as error:
                message = ("error", str(error), "")
            if message[0] == "error":  # the process could not start any of them
                message = ("ready", {}, {name: (message[1], message[2]) for name in group})
            seconds = time.perf_counter() - started
            _, ready, errors = message
            for name, (error, detail) in errors.items():
                store.record_failure(name, error, None, detail=detail)
                failed[name] = error
                say(f"{name} failed to start: {error}")
            for name in group:
                if name not in ready:
                    continue
                cold = COLD_BLOCK - epoch
                if (name, cold) not in completed:
                    samples = [Sample.from_dict(s) for s in ready[name]]
                    samples.append(_start_sample(name, cold, seconds, len(group)))
                    store.append_block(name, cold, _labelled(samples, epoch, cold))
                live[name] = worker
            if not ready:
                _stop(worker)
    except BaseException:
        for worker in _processes(live):
            _stop(worker)
        raise
    return live


def idle_watts(store: RunStore) -> float | None:
    """The device's idle power the parent measured for this run, if its meter measures."""
    idle = store.meta.get("idle_power")
    return float(idle["watts"]) if isinstance(idle, dict) else None


def _start_sample(name: str, block: int, seconds: float, sharing: int) -> Sample:
    """How long a worker process took from spawn to ready: the cost of one more process.
    `sharing` is how many configurations it loaded (co-resident ones share one start)."""
    now = time.time()
    return Sample(
        name,
        block,
        "worker_start_s",
        seconds,
        "s",
        "total",
        "measured",
        now - seconds,
        now,
        {"sharing": sharing},
    )


def _labelled(samples: list[Sample], epoch: int, block: int) -> list[Sample]:
    for sample in samples:
        sample.block = block
        sample.extra[PROCESS_KEY] = epoch
    return samples


def _epoch_rounds(
    spec: RunSpec,
    store: RunStore,
    live: dict[str, _Live],
    epoch: int,
    epoch_done: Callable[[str], bool],
    state: _Progress,
    failed: dict[str, str],
    budget_start: float,
    say: ProgressFn,
) -> bool:
    """Rounds of one epoch until every live worker has met its share; True if the budget
    stopped them. A round a killed run left half done is finished first."""
    protocol = spec.protocol
    names = [c.name for c in spec.configurations]
    completed = store.completed_blocks()
    stored = state.rounds[state.rounds.epoch == epoch]["round"]
    pending = sorted(set(stored)) + [state.next_round()]
    while live:
        if all(epoch_done(n) for n in live):
            return False
        if _over_budget(protocol, budget_start):
            return True
        round_index = pending.pop(0) if pending else state.next_round()
        for name in round_order(names, protocol.seed, round_index):
            if name not in live or (name, round_index) in completed or epoch_done(name):
                continue
            worker = live[name]
            try:
                message = _ask(worker, ("block", name, round_index), BLOCK_TIMEOUT_S)
            except (TimeoutError, RuntimeError, BrokenPipeError, OSError) as error:
                message = ("error", str(error), "")
                # A process that hung or died is gone for every configuration it held; the
                # others start again in a fresh one (`_run_group`).
                for other in worker.names:
                    live.pop(other, None)
                _stop(worker)
            if message[0] == "error":
                store.record_failure(name, message[1], round_index, detail=message[2])
                failed[name] = message[1]
                say(f"{name} failed in round {round_index}: {message[1]}")
                if live.pop(name, None) is not None and not any(
                    other in live for other in worker.names
                ):
                    _stop(worker)
                continue
            samples = _labelled([Sample.from_dict(s) for s in message[1]], epoch, round_index)
            store.append_block(name, round_index, samples)
            # One block_seconds per batch size served: the block's timed seconds are their sum.
            seconds = sum(s.value for s in samples if s.metric == "block_seconds")
            state.add(name, round_index, epoch, seconds)
        least = min((state.done(n, epoch)[1] for n in live), default=0.0)
        say(
            f"process {epoch + 1}/{protocol.processes}, round {round_index + 1}; timed "
            f"{least:.0f}/{protocol.min_seconds / protocol.processes:.0f} s per configuration "
            f"in this process; {time.perf_counter() - budget_start:.0f} s elapsed"
        )
    return False
