"""The ``pretrain`` command: ``pretrain data ...``, ``pretrain train``, and friends.

Each area registers its own subcommands; a user error (bad input, bad config) prints one
``error: ...`` line and exits with status 2 instead of a stack trace; training that cannot go on
(``train.max_bad_steps`` consecutive non-finite losses) prints one ``error: ...`` line too and
exits with status 3.
"""

from __future__ import annotations

import argparse
import sys

from data.cli import add_data_commands
from data.errors import DataError
from data.indexed import IndexedFormatError
from data.preprocess import PreprocessError
from data.readers import InputError
from data.tokenizer import TokenizerError
from pretrain.errors import CheckpointError, TrainingError
from pretrain.commands import add_run_commands
from models.configtree import ConfigError
from tools.scaling.cli import add_scaling_commands

USER_ERRORS = (
    IndexedFormatError, InputError, TokenizerError, PreprocessError, DataError, ConfigError, CheckpointError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_commands(commands)
    add_data_commands(commands)
    add_scaling_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
