"""The ``pretrain`` command: ``pretrain data ...``, ``pretrain train``, and friends.

Each area registers its own subcommands; a user error (bad input, bad config) prints one
``error: ...`` line and exits with status 2 instead of a stack trace; training that cannot go on
(``train.max_bad_steps`` consecutive non-finite losses) prints one ``error: ...`` line too and
exits with status 3. In a job of several processes an error on one rank ends that process at once
(``os._exit``, skipping the process-group shutdown that would wait on peers stuck in a
collective), so the launcher (torchrun, srun, mpirun) sees the failure and stops the others.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from data.cli import add_data_commands
from data.errors import DataError
from data.indexed import IndexedFormatError
from data.preprocess import PreprocessError
from data.readers import InputError
from data.tokenizer import TokenizerError
from pretrain.errors import CheckpointError, ReportError, TrainingError
from pretrain.commands import add_matformer_commands, add_run_commands
from pretrain.convert.cli import add_convert_commands
from models.configtree import ConfigError
from tools.scaling.cli import add_scaling_commands

USER_ERRORS = (
    IndexedFormatError, InputError, TokenizerError, PreprocessError, DataError, ConfigError, CheckpointError,
    ReportError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_commands(commands)
    add_matformer_commands(commands)
    add_data_commands(commands)
    add_scaling_commands(commands)
    add_convert_commands(commands)
    return parser


def _in_a_job() -> bool:
    """True inside a process group of several ranks (torch already imported by the command)."""
    dist = sys.modules.get("torch.distributed")
    return bool(dist and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _fail(code: int, message: str) -> int:
    """Report an error; in a multi-rank job also leave at once (peers may be blocked in a
    collective and would never join a graceful shutdown)."""
    print(message, file=sys.stderr, flush=True)
    if _in_a_job():
        sys.stdout.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except USER_ERRORS as e:
        return _fail(2, f"error: {e}")
    except TrainingError as e:
        return _fail(3, f"error: {e}")
    except KeyboardInterrupt:
        return _fail(130, "interrupted")
    except Exception:
        if not _in_a_job():
            raise
        return _fail(1, f"rank {os.environ.get('RANK', '?')} failed:\n{traceback.format_exc().rstrip()}")


if __name__ == "__main__":
    sys.exit(main())
