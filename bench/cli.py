"""The `compound` command: one subcommand per job, every error one line and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from core.errors import CompoundError, RunInterrupted

# Each module listed here exposes `register(subparsers)`, which adds its subcommand
# with `parser.set_defaults(handler=...)`; a handler takes the parsed args and returns an exit code.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "bench.commands.models",
    "bench.commands.train",
    "bench.commands.distill",
    "bench.commands.evaluate",
    "bench.commands.run",
    "bench.commands.calibrate",
    "bench.commands.attention",
    "bench.commands.sparse_gemm",
    "bench.commands.coldstart",
    "bench.commands.compare",
    "bench.commands.export",
    "bench.commands.judge",
    "bench.commands.sweep",
    "bench.commands.transforms",
    "bench.commands.formula",
    "bench.commands.wrap",
)
# Set to re-raise unexpected exceptions with their traceback (for developing compound-bench).
DEBUG_ENV_VAR = "COMPOUND_DEBUG"


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad usage prints one line that says where help is, not the whole usage block.

    Abbreviated options are off: `--req 4` must not quietly mean `--requests 4`, and the set of
    options named on the command line must be exact (see `given_options`).
    """

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

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


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the options named on the command line, whatever their values."""
    named = {token.split("=", 1)[0] for token in argv if token.startswith("-")}
    return {
        action.dest
        for action in parser._actions  # argparse keeps its actions private; no public view
        if named.intersection(action.option_strings)
    }


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed arguments, plus `given`: the options named on the command line. An unknown flag
    is the subcommand's error, pointing at its --help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command = commands[args.command]
    if unknown:
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.given = given_options(command, argv)
    return args


def _unexpected(error: Exception) -> int:
    """A bug, not bad input: one line, with the traceback kept in a file for the report."""
    handle, name = tempfile.mkstemp(prefix="compound-error-", suffix=".log")
    with os.fdopen(handle, "w") as log:
        log.write(traceback.format_exc())
    first = str(error).strip().splitlines()
    detail = f": {first[0]}" if first else ""
    print(
        f"compound: error: unexpected {type(error).__name__}{detail} (a bug in compound-bench; "
        f"the traceback is in {Path(name)})",
        file=sys.stderr,
    )
    return 1


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
    except Exception as error:
        if os.environ.get(DEBUG_ENV_VAR):
            raise
        return _unexpected(error)


if __name__ == "__main__":
    sys.exit(main())
