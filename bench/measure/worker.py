"""One worker process per configuration: load, transform, warm up, then time blocks on request.

A separate process per configuration means a crash or out-of-memory loses only that
configuration, and the process's peak RSS is that configuration's own peak.
Messages over the pipe: parent sends ("block", index) or ("stop",); the worker answers
("ready", samples), ("block", samples) or ("error", one-line message, traceback).
"""

from __future__ import annotations

import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch

from bench.configuration import Configuration, RunSpec
from bench.measure.loading import apply_configuration, load_bundle
from bench.measure.trackers.cost import carbon_sample, cost_sample
from bench.measure.trackers.energy import select_energy_meter
from bench.measure.trackers.events import EventTracker
from bench.measure.trackers.latency import Clock, RequestTiming, set_threads, synchronize
from bench.measure.trackers.memory import MemoryTracker
from bench.measure.trackers.modules import ModuleTimer
from bench.measure.trackers.system_load import LoadMeter
from bench.measure.workload import build_requests, serve_timed
from core.samples import Sample, Source
from models.generation import generate
from models.prompting import Request

COLD = -1  # block index of one-off records taken before the timed rounds


def _busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Worker:
    """Holds one configuration's bundle and requests, and measures one block at a time."""

    def __init__(self, spec: RunSpec, configuration: Configuration) -> None:
        self.spec = spec
        self.configuration = configuration
        self.name = configuration.name
        set_threads(spec.protocol.threads)
        torch.manual_seed(spec.protocol.seed)
        self.bundle = apply_configuration(load_bundle(spec.source), configuration)
        self.device = self.bundle.device
        self.clock = Clock(self.device)
        self.events = EventTracker(self.device)
        self.bundle.events.listener = self.events
        self.requests = build_requests(self.bundle, spec.workload)
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

    def serve(self, request: Request) -> RequestTiming:
        timing = serve_timed(self.bundle, request, self.spec.workload.new_tokens, self.clock)
        if self.configuration.slowdown:
            extra = timing.end_to_end * self.configuration.slowdown
            _busy_wait(extra)
            timing.end_to_end += extra
        return timing

    def warm_up(self) -> list[Sample]:
        """The cold first call is its own figure; the warm-up calls after it are discarded.

        The figures the transforms reported on being applied (bytes freed) and while warming
        up (the first, cold wake) are stored with the cold call, before the timed rounds.
        """
        t_start = time.time()
        cold = self.serve(self.requests[0])
        for i in range(self.spec.protocol.warmup_requests):
            self.serve(self.requests[i % len(self.requests)])
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
        memory = MemoryTracker(self.device, module=self.bundle.model)
        with self.load.window() as load, self.meter.window() as energy, memory:
            t_start = time.time()
            wall_start = time.perf_counter()
            timings = self.serve_block(wall_start)
            synchronize(self.device)
            wall = time.perf_counter() - wall_start
            t_end = time.time()
        window = (t_start, t_end)
        samples = self.request_samples(block, timings, window)
        n = len(timings)
        tokens = sum(t.new_tokens for t in timings)
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
        if protocol.module_pass_every and block % protocol.module_pass_every == 0:
            samples += self.module_pass(block, wall)
        return samples

    def serve_block(self, wall_start: float) -> list[RequestTiming]:
        """The block's requests, served again whole until the block lasts `min_block_seconds`:
        NVML's energy counter updates every ~100 ms, so shorter windows are quantised."""
        timings: list[RequestTiming] = []
        while True:
            timings += [self.serve(request) for request in self.requests]
            synchronize(self.device)
            shortest = max(self.spec.protocol.min_block_seconds, self.meter.min_window_s)
            if time.perf_counter() - wall_start >= shortest:
                return timings

    def request_samples(
        self, block: int, timings: list[RequestTiming], window: tuple[float, float]
    ) -> list[Sample]:
        samples = []
        passes = len(timings) // len(self.requests)
        for i, (request, timing) in enumerate(zip(self.requests * passes, timings, strict=True)):
            per_request = {"latency_e2e_s": timing.end_to_end, "latency_prefill_s": timing.prefill}
            if timing.time_per_output_token is not None:
                per_request["latency_decode_per_token_s"] = timing.time_per_output_token
            for metric, value in per_request.items():
                samples.append(
                    self.sample(
                        block,
                        metric,
                        value,
                        "s",
                        window,
                        request=i % len(self.requests),
                        modality=request.example.modality,
                    )
                )
        return samples

    def module_pass(self, block: int, unhooked_seconds: float) -> list[Sample]:
        """Serve the block again with hooks on, for per-module time and the hooks' own overhead.

        The transforms' events are not listened to here: this pass is not a timed block.
        """
        self.bundle.events.listener = None
        t_start = time.time()
        with ModuleTimer(self.bundle.handles(), self.device) as timer:
            wall_start = time.perf_counter()
            for request in self.requests:
                generate(self.bundle, request, self.spec.workload.new_tokens)
            synchronize(self.device)
            hooked = time.perf_counter() - wall_start
            totals = timer.collect()
        self.bundle.events.listener = self.events
        window = (t_start, time.time())
        samples = [
            self.sample(
                block, "module_time_s", value.seconds, "s", window, module=module, calls=value.calls
            )
            for module, value in totals.items()
        ]
        samples.append(self.sample(block, "hooked_block_seconds", hooked, "s", window))
        overhead = hooked / unhooked_seconds - 1.0
        samples.append(
            self.sample(block, "hook_overhead", overhead, "fraction", window, source="derived")
        )
        return samples


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def worker_main(conn: Connection, spec_data: dict[str, Any], config_index: int) -> None:
    """Entry point of the spawned process."""
    try:
        spec = RunSpec.from_dict(spec_data)
        worker = Worker(spec, spec.configurations[config_index])
        conn.send(("ready", [s.to_dict() for s in worker.warm_up()]))
    except Exception as error:  # report, then exit: the parent records the failure
        conn.send(("error", _one_line(error), traceback.format_exc()))
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        try:
            conn.send(("block", [s.to_dict() for s in worker.run_block(message[1])]))
        except Exception as error:
            conn.send(("error", _one_line(error), traceback.format_exc()))
            return
