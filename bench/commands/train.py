"""`compound train`: train a preset's teacher model and cache its checkpoint."""

from __future__ import annotations

import argparse

from bench.commands.common import add_cache_arg, add_json_arg, print_json
from models.checkpoint import cache_dir, checkpoint_path
from models.presets import DEFAULT_PRESET, PRESETS, get_preset
from models.teacher import ensure_trained


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a preset on the generated dataset")
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        help=f"a trainable preset ({', '.join(n for n, p in PRESETS.items() if not p.cost_only)})",
    )
    parser.add_argument(
        "--force", action="store_true", help="retrain even if a checkpoint is cached"
    )
    add_cache_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    cache = cache_dir(args.cache_dir)
    preset = get_preset(args.preset)
    bundle, trained_now = ensure_trained(
        preset.name, cache, show_progress=not args.json, retrain=args.force
    )
    report = {
        "preset": preset.name,
        "trained_now": trained_now,
        "checkpoint": str(checkpoint_path(preset, cache)),
        "params": bundle.param_count(),
        **{k: bundle.metadata.get(k) for k in ("train_seconds", "val_accuracy", "torch_threads")},
    }
    if args.json:
        print_json(report)
    else:
        verb = "trained" if trained_now else "already cached"
        print(f"{preset.name}: {verb} at {report['checkpoint']}")
        print(
            f"  {report['params']:,} parameters, trained in {report['train_seconds']} s "
            f"on {report['torch_threads']} threads; validation accuracy {report['val_accuracy']}"
        )
    return 0
