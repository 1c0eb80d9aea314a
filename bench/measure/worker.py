"""A worker process: load, transform, warm up, then time blocks on request.

It holds one configuration (placement `isolated`: a crash or out-of-memory loses only that
configuration, and the process's peak RSS is that configuration's own) or several
(`coresident`: they share the process, its offset and its caches, so a contrast between them
cancels what a process adds; memory is then measured in a separate isolated pass).
Messages over the pipe: the parent sends ("block", config, index) or ("stop",); the worker
answers ("ready", {config: samples}, {config: (one-line message, traceback)}) once, then
("block", samples) or ("error", one-line message, traceback) per block. A configuration that
fails a block is dropped; the others in the process go on.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from multiprocessing.connection import Connection
from typing import Any

import torch

from bench.configuration import Configuration, RunSpec
from bench.measure.loading import apply_configuration, load_bundle
from bench.measure.trackers.cost import carbon_sample, cost_sample
from bench.measure.trackers.energy import per_request_energy, select_energy_meter
from bench.measure.trackers.events import EventTracker
from bench.measure.trackers.latency import Clock, RequestTiming, set_threads, synchronize
from bench.measure.trackers.memory import MemoryTracker
from bench.measure.trackers.modules import ModuleTimer
from bench.measure.trackers.system_load import LoadMeter
from bench.measure.workload import batches, build_requests, cache_length, serve_timed
from core.samples import BATCH_KEY, Sample, Source
from models.generation import generate
from models.prompting import Request

COLD = -1  # block index of one-off records taken before the timed rounds


def _busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Worker:
    """Holds one configuration's bundle and requests, and measures one block at a time."""

    def __init__(
        self,
        spec: RunSpec,
        configuration: Configuration,
        idle_watts: float | None = None,
        track_memory: bool = True,
    ) -> None:
        self.spec = spec
        self.idle_watts = idle_watts
        self.track_memory = track_memory
        self.configuration = configuration
        self.name = configuration.name
        set_threads(spec.protocol.threads)
        torch.manual_seed(spec.protocol.seed)
        self.bundle = apply_configuration(load_bundle(spec.source, configuration), configuration)
        self.device = self.bundle.device
        self.clock = Clock(self.device)
        self.events = EventTracker(self.device)
        self.bundle.events.listener = self.events
        self.requests = build_requests(self.bundle, spec.workload)
        self.engine = spec.serving.engine
        self.cache_length = cache_length(self.requests, spec.workload.new_tokens)
        self.batches = {size: batches(self.requests, size) for size in spec.serving.batch_sizes}
        self.meter = select_energy_meter(self.device, spec.protocol.watts_per_core)
        self.load = LoadMeter()

    def sample(
        self,
        block: int,
        metric: str,
        value: float,
        unit: str,
        window: tuple[float, float],
        *,
        module: str = "total",
        source: Source = "measured",
        **extra: Any,
    ) -> Sample:
        """A sample of this configuration in `block`, over the wall-clock `window`."""
        t_start, t_end = window
        return Sample(
            self.name, block, metric, value, unit, module, source, t_start, t_end, dict(extra)
        )

    def serve(self, batch: list[Request]) -> RequestTiming:
        timing = serve_timed(
            self.bundle,
            batch,
            self.spec.workload.new_tokens,
            self.clock,
            engine=self.engine,
            cache_length=self.cache_length,
        )
        if self.configuration.slowdown:
            extra = timing.end_to_end * self.configuration.slowdown
            _busy_wait(extra)
            timing.end_to_end += extra
        return timing

    def warm_up(self) -> list[Sample]:
        """The cold first call is its own figure; the warm-up calls after it are discarded.

        Every batch size is warmed up (with `graphs`, its CUDA graph is captured here), and
        the engine of the hooked pass when it differs.
        The figures the transforms reported on being applied (bytes freed) and while warming
        up (the first, cold wake) are stored with the cold call, before the timed rounds.
        """
        t_start = time.time()
        with self.fresh_stream():
            cold = self.serve([self.requests[0]])
            for size, served in self.batches.items():
                for i in range(max(self.spec.protocol.warmup_requests, 1 if size > 1 else 0)):
                    self.serve(served[i % len(served)])
            if self.module_engine != self.engine and self.spec.protocol.module_pass_every:
                self.generate_primary()  # the hooked pass's engine allocates its cache here
        window = (t_start, time.time())
        modality = self.requests[0].example.modality
        samples = [
            self.sample(COLD, "latency_cold_s", cold.end_to_end, "s", window, modality=modality)
        ]
        for applied in self.bundle.metadata.get("transforms", []):
            for figure in applied["figures"]:
                samples.append(
                    self.sample(
                        COLD,
                        figure["metric"],
                        figure["value"],
                        figure["unit"],
                        window,
                        module=figure["module"],
                        source="derived",
                        transform=applied["name"],
                    )
                )
        return samples + self.events.samples(self.name, COLD, *window)

    def run_block(self, block: int) -> list[Sample]:
        """The block at every batch size, in an order shuffled per block (no size always
        first); each size has its own windows, and every sample says its batch size."""
        sizes = list(self.spec.serving.batch_sizes)
        random.Random(f"{self.spec.protocol.seed}:{block}").shuffle(sizes)
        samples = []
        for size in sizes:
            served = self.serve_at(block, size)
            for sample in served:
                sample.extra[BATCH_KEY] = size
            samples += served
        return samples

    @contextmanager
    def fresh_stream(self) -> Iterator[None]:
        """The transforms' per-stream state (`ModelBundle.block_states`) begun before and
        ended after the body: every block serves its requests as the same fresh stream."""
        for state in self.bundle.block_states:
            state.begin_block()
        try:
            yield
        finally:
            for state in self.bundle.block_states:
                state.end_block()

    def serve_at(self, block: int, batch_size: int) -> list[Sample]:
        memory = MemoryTracker(self.device, module=self.bundle.model)
        # A process that holds several configurations has one peak for all of them.
        tracked = memory if self.track_memory else nullcontext()
        with self.load.window() as load, self.meter.window() as energy, tracked:
            t_start = time.time()
            wall_start = time.perf_counter()
            served = self.serve_block(self.batches[batch_size], wall_start)
            synchronize(self.device)
            wall = time.perf_counter() - wall_start
            t_end = time.time()
        window = (t_start, t_end)
        samples = self.batch_samples(block, served, window)
        n = sum(len(batch) for batch, _ in served)
        tokens = sum(len(batch) * timing.new_tokens for batch, timing in served)
        block_figures = {
            "block_seconds": (wall, "s"),
            "latency_mean_s": (wall / n, "s"),
            "throughput_rps": (n / wall, "requests/s"),
            "throughput_tps": (tokens / wall, "tokens/s"),
        }
        for metric, (value, unit) in block_figures.items():
            samples.append(
                self.sample(block, metric, value, unit, window, requests=n, tokens=tokens)
            )
        energy_samples = energy.samples(self.name, block)
        for sample in energy_samples:
            sample.extra["requests"] = n
        samples += energy_samples
        samples += per_request_energy(energy_samples, n, tokens, self.idle_watts)
        if self.track_memory:
            samples += memory.samples(self.name, block)
        samples += load.samples(self.name, block)
        protocol = self.spec.protocol
        samples.append(
            cost_sample(
                self.name,
                block,
                device_seconds=wall,
                n_requests=n,
                price_per_device_hour=protocol.price_per_device_hour,
                t_start=t_start,
                t_end=t_end,
            )
        )
        samples += [carbon_sample(s, protocol.grid_g_per_kwh) for s in energy_samples]
        samples += self.events.samples(self.name, block, t_start, t_end)
        primary = batch_size == self.spec.serving.primary_batch
        if primary and protocol.module_pass_every and block % protocol.module_pass_every == 0:
            passes = len(served) // len(self.batches[batch_size])
            samples += self.module_pass(block, wall / passes)
        return samples

    def serve_block(
        self, served: list[list[Request]], wall_start: float
    ) -> list[tuple[list[Request], RequestTiming]]:
        """The block's batches, served again whole until the block lasts `min_block_seconds`:
        NVML's energy counter updates every ~100 ms, so shorter windows are quantised. Each
        pass is a fresh stream (a vision cache hits only on repeats within it)."""
        timings: list[tuple[list[Request], RequestTiming]] = []
        while True:
            with self.fresh_stream():
                timings += [(batch, self.serve(batch)) for batch in served]
            synchronize(self.device)
            shortest = max(self.spec.protocol.min_block_seconds, self.meter.min_window_s)
            if time.perf_counter() - wall_start >= shortest:
                return timings

    def batch_samples(
        self,
        block: int,
        served: list[tuple[list[Request], RequestTiming]],
        window: tuple[float, float],
    ) -> list[Sample]:
        """Per-request latencies; a batch's requests share one timing, stored once per batch
        with how many requests (and images) it held."""
        samples = []
        index = {id(request): i for i, request in enumerate(self.requests)}
        for batch, timing in served:
            per_request = {"latency_e2e_s": timing.end_to_end, "latency_prefill_s": timing.prefill}
            if timing.time_per_output_token is not None:
                per_request["latency_decode_per_token_s"] = timing.time_per_output_token
            modalities = {request.example.modality for request in batch}
            where: dict[str, Any] = {
                "modality": modalities.pop() if len(modalities) == 1 else "mixed"
            }
            if len(batch) == 1:
                where["request"] = index[id(batch[0])]
            else:
                where["requests"] = len(batch)
                where["images"] = sum(r.pixel_values is not None for r in batch)
            for metric, value in per_request.items():
                samples.append(self.sample(block, metric, value, "s", window, **where))
        return samples

    @property
    def module_engine(self) -> str:
        """The engine of the hooked pass: hooks do not fire inside a replayed CUDA graph, so
        under `graphs` modules are timed with the same static cache, uncaptured."""
        return "static" if self.engine == "graphs" else self.engine

    def serve_once(self) -> float:
        """Wall seconds of one pass over the primary batch size's batches, unhooked."""
        wall_start = time.perf_counter()
        self.generate_primary()
        synchronize(self.device)
        return time.perf_counter() - wall_start

    def generate_primary(self) -> None:
        for batch in self.batches[self.spec.serving.primary_batch]:
            generate(
                self.bundle,
                batch,
                self.spec.workload.new_tokens,
                engine=self.module_engine,
                cache_length=self.cache_length,
            )

    def module_pass(self, block: int, unhooked_pass_seconds: float) -> list[Sample]:
        """Serve the block's batches once more with hooks on, for per-module time and the
        hooks' own overhead against one unhooked pass (timed again here when the hooked pass
        runs another engine than the block did).

        The transforms' events are not listened to here: this pass is not a timed block.
        """
        self.bundle.events.listener = None
        if self.module_engine != self.engine:
            with self.fresh_stream():
                unhooked_pass_seconds = self.serve_once()
        t_start = time.time()
        with self.fresh_stream(), ModuleTimer(self.bundle.handles(), self.device) as timer:
            wall_start = time.perf_counter()
            self.generate_primary()
            synchronize(self.device)
            hooked = time.perf_counter() - wall_start
            totals = timer.collect()
        self.bundle.events.listener = self.events
        window = (t_start, time.time())
        samples = [
            self.sample(
                block,
                "module_time_s",
                value.seconds,
                "s",
                window,
                module=module,
                calls=value.calls,
                engine=self.module_engine,
            )
            for module, value in totals.items()
        ]
        samples.append(self.sample(block, "hooked_block_seconds", hooked, "s", window))
        overhead = hooked / unhooked_pass_seconds - 1.0
        samples.append(
            self.sample(block, "hook_overhead", overhead, "fraction", window, source="derived")
        )
        return samples


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def worker_main(
    conn: Connection,
    spec_data: dict[str, Any],
    config_indices: list[int],
    idle_watts: float | None = None,
) -> None:
    """Entry point of the started process: the configurations `config_indices` of the spec;
    `idle_watts` is the device's idle power, measured once per run by the parent (None when
    its meter only estimates). Memory is tracked only when the process holds one."""
    try:
        spec = RunSpec.from_dict(spec_data)
    except Exception as error:
        conn.send(("error", _one_line(error), traceback.format_exc()))
        return
    workers: dict[str, Worker] = {}
    ready: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, tuple[str, str]] = {}
    for index in config_indices:
        configuration = spec.configurations[index]
        try:
            worker = Worker(spec, configuration, idle_watts, len(config_indices) == 1)
            ready[configuration.name] = [s.to_dict() for s in worker.warm_up()]
            workers[configuration.name] = worker
        except Exception as error:  # report; the parent records the failure
            errors[configuration.name] = (_one_line(error), traceback.format_exc())
    conn.send(("ready", ready, errors))
    if not workers:
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        _, name, block = message
        try:
            conn.send(("block", [s.to_dict() for s in workers[name].run_block(block)]))
        except Exception as error:
            workers.pop(name, None)
            conn.send(("error", _one_line(error), traceback.format_exc()))
