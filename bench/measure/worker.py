"""One worker process per configuration: load, transform, warm up, then time blocks on request.

A separate process per configuration means a crash or out-of-memory loses only that
configuration, and the process's peak RSS is that configuration's own peak.
Messages over the pipe: parent sends ("block", index) or ("stop",); the worker answers
("ready", samples), ("block", samples) or ("error", one-line message).
"""

from __future__ import annotations

import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch

from bench.configuration import Configuration, ModelSource, RunSpec
from bench.measure.trackers.cost import carbon_sample, cost_sample
from bench.measure.trackers.energy import select_energy_meter
from bench.measure.trackers.latency import RequestTiming, set_threads, synchronize
from bench.measure.trackers.memory import MemoryTracker
from bench.measure.trackers.modules import ModuleTimer
from bench.measure.workload import build_requests, generate, serve_timed
from core.samples import Sample
from models.bundle import ModelBundle
from models.prompting import Request

COLD = -1  # block index of one-off records taken before the timed rounds


def load_bundle(source: ModelSource) -> ModelBundle:
    from models.checkpoint import build_bundle, cache_dir, load_model_dir, load_trained
    from models.presets import get_preset

    dtype = getattr(torch, source.dtype)
    if source.model_path:
        return load_model_dir(source.model_path, device=source.device, dtype=dtype)
    preset = get_preset(str(source.preset))
    if preset.cost_only:
        return build_bundle(preset.name, device=source.device, dtype=dtype, materialize=True)
    return load_trained(preset.name, cache_dir(source.cache_dir), device=source.device, dtype=dtype)


def apply_configuration(bundle: ModelBundle, configuration: Configuration) -> ModelBundle:
    if not configuration.transforms:
        return bundle
    from optimizations.registry import apply_transforms

    # In place: the worker never needs the baseline, and two copies would inflate its peak RSS.
    return apply_transforms(bundle, configuration.transforms, copy=False)


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
        self.requests = build_requests(self.bundle, spec.workload)
        self.meter = select_energy_meter(self.device, spec.protocol.watts_per_core)

    def serve(self, request: Request) -> RequestTiming:
        timing = serve_timed(self.bundle, request, self.spec.workload.new_tokens)
        if self.configuration.slowdown:
            extra = timing.end_to_end * self.configuration.slowdown
            _busy_wait(extra)
            timing.end_to_end += extra
        return timing

    def warm_up(self) -> list[Sample]:
        """The cold first call is its own figure; the warm-up calls after it are discarded."""
        t_start = time.time()
        cold = self.serve(self.requests[0])
        samples = [
            Sample(
                self.name,
                COLD,
                "latency_cold_s",
                cold.end_to_end,
                "s",
                t_start=t_start,
                t_end=time.time(),
                extra={"modality": self.requests[0].example.modality},
            )
        ]
        for i in range(self.spec.protocol.warmup_requests):
            self.serve(self.requests[i % len(self.requests)])
        # What the transforms logged while applied and warming up (the first wake is cold).
        return samples + self.transform_figures(COLD, t_start, time.time())

    def transform_figures(self, block: int, t_start: float, t_end: float) -> list[Sample]:
        """Drain what the transforms logged while serving (wake latency, tokens kept, ...)."""
        log = self.bundle.metadata.get("figures", [])
        samples = [
            Sample(
                self.name,
                block,
                figure["metric"],
                float(figure["value"]),
                figure["unit"],
                module=figure.get("module", "total"),
                source=figure.get("source", "measured"),
                t_start=t_start,
                t_end=t_end,
            )
            for figure in log
        ]
        log.clear()
        return samples

    def run_block(self, block: int) -> list[Sample]:
        samples: list[Sample] = []
        memory = MemoryTracker(self.device, module=self.bundle.model)
        with self.meter.window() as energy, memory:
            t_start = time.time()
            wall_start = time.perf_counter()
            timings = [self.serve(request) for request in self.requests]
            synchronize(self.device)
            wall = time.perf_counter() - wall_start
            t_end = time.time()
        for i, (request, timing) in enumerate(zip(self.requests, timings, strict=True)):
            extra = {"request": i, "modality": request.example.modality}
            per_request = {"latency_e2e_s": timing.end_to_end, "latency_prefill_s": timing.prefill}
            if timing.time_per_output_token is not None:
                per_request["latency_decode_per_token_s"] = timing.time_per_output_token
            for metric, value in per_request.items():
                samples.append(
                    Sample(
                        self.name,
                        block,
                        metric,
                        value,
                        "s",
                        t_start=t_start,
                        t_end=t_end,
                        extra=extra,
                    )
                )
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
                Sample(
                    self.name,
                    block,
                    metric,
                    value,
                    unit,
                    t_start=t_start,
                    t_end=t_end,
                    extra={"requests": n, "tokens": tokens},
                )
            )
        energy_samples = energy.samples(self.name, block)
        for sample in energy_samples:
            sample.extra["requests"] = n
        samples += energy_samples
        samples += memory.samples(self.name, block)
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
        samples += self.transform_figures(block, t_start, t_end)
        if protocol.module_pass_every and block % protocol.module_pass_every == 0:
            samples += self.module_pass(block, wall)
            self.bundle.metadata.get("figures", []).clear()  # the hooked pass is not timed
        return samples

    def module_pass(self, block: int, unhooked_seconds: float) -> list[Sample]:
        """Serve the block again with hooks on, for per-module time and the hooks' own overhead."""
        samples: list[Sample] = []
        t_start = time.time()
        totals: dict[str, float] = {}
        calls: dict[str, int] = {}
        with ModuleTimer(self.bundle.handles(), self.device) as timer:
            wall_start = time.perf_counter()
            for i, request in enumerate(self.requests):
                generate(self.bundle, request, self.spec.workload.new_tokens)
                collected = timer.collect()
                timer.reset()
                for module, value in collected.items():
                    totals[module] = totals.get(module, 0.0) + value.seconds
                    calls[module] = calls.get(module, 0) + value.calls
                if request.example.has_image:
                    extra = {"request": i, "modality": "image"}
                    for module, metric in (
                        ("vision_encoder", "latency_vision_encode_s"),
                        ("projector", "latency_projector_s"),
                    ):
                        samples.append(
                            Sample(
                                self.name,
                                block,
                                metric,
                                collected[module].seconds,
                                "s",
                                module=module,
                                t_start=t_start,
                                extra=extra,
                            )
                        )
            synchronize(self.device)
            hooked = time.perf_counter() - wall_start
        t_end = time.time()
        for module, seconds in totals.items():
            samples.append(
                Sample(
                    self.name,
                    block,
                    "module_time_s",
                    seconds,
                    "s",
                    module=module,
                    t_start=t_start,
                    t_end=t_end,
                    extra={"calls": calls[module]},
                )
            )
        samples.append(
            Sample(
                self.name, block, "hooked_block_seconds", hooked, "s", t_start=t_start, t_end=t_end
            )
        )
        samples.append(
            Sample(
                self.name,
                block,
                "hook_overhead",
                hooked / unhooked_seconds - 1.0,
                "fraction",
                source="derived",
                t_start=t_start,
                t_end=t_end,
            )
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
