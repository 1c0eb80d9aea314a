"""The `compound` command: one subcommand per job, user errors as one line and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from core.errors import CompoundError, RunInterrupted

# Each module listed here exposes `register(subparsers)`, which adds its subcommand
# with `parser.set_defaults(handler=...)`; a handler takes the parsed args and returns an exit code.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "bench.commands.models",
    "bench.commands.train",
    "bench.commands.evaluate",
    "bench.commands.run",
    "bench.commands.calibrate",
    "bench.commands.transforms",
    "bench.commands.formula",
    "bench.commands.wrap",
)


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad usage prints one line that says where help is, not the whole usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `compound` parser and each subcommand's parser, by name."""
    import importlib

    parser = OneLineErrorParser(
        prog="compound",
        description="Measure whether per-module optimizations of a multimodal model compound.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser, subparsers.choices


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed arguments; an unknown flag is the subcommand's error, pointing at its --help."""
    parser, commands = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        return int(args.handler(args) or 0)
    except RunInterrupted as stopped:
        print(f"compound: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except CompoundError as error:
        print(f"compound: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("compound: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
