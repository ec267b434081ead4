"""The `clap` console script: one subcommand per job.

    clap models                       # registered architectures
    clap preprocess --input M --output OUT [--config FILE] [key=value ...]
    clap pretrain --data SHARDS --output RUN --model tiny [--config FILE] [key=value ...]
    clap evaluate / embed / export / search / tune-probe / demo

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`; modules
are imported only when their subcommand runs, so `clap models` starts fast and without Ray.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from clap_core.config import CheckpointError, ConfigError
from clap_core.io_faults import StorageAccessError
from pipelines.console import VERBOSE_ENV, VERBOSE_FLAG, finish_log, report_failure

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "models": ("pipelines.models_cmd", "list registered model architectures or show one"),
    "preprocess": ("pipelines.preprocess", "raw audio corpus -> augmented 48 kHz Parquet shards (Ray Data)"),
    "pretrain": ("pipelines.pretrain", "contrastive pretraining (Ray Train + DeepSpeed)"),
    "evaluate": ("pipelines.evaluate", "retrieval and zero-shot evaluation of a checkpoint"),
    "embed": ("pipelines.embed", "batch audio/text embedding to Parquet (Ray Data)"),
    "export": ("pipelines.export_cmd", "a checkpoint as a transformers ClapModel folder or ONNX graphs"),
    "search": ("pipelines.search", "top-k clips for a text or audio query"),
    "tune-probe": ("pipelines.tune_probe", "MELD emotion probe sweep (Ray Tune)"),
    "demo": ("pipelines.demo", "the whole pipeline on a small generated corpus"),
}


def available_subcommands() -> dict[str, tuple[str, str]]:
    """Subcommands whose module is present in this install."""
    return {name: spec for name, spec in SUBCOMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def go_offline() -> None:
    """No hub access: named models get random text weights + the byte tokenizer (clap_core.model.config)."""
    from clap_core.model.config import OFFLINE_ENV

    os.environ[OFFLINE_ENV] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object]:
    parser = argparse.ArgumentParser(prog="clap", description="Contrastive language-audio pretraining at scale.",
                                     epilog=f"{OFFLINE_FLAG} (any position, or CLAP_OFFLINE=1): build named models "
                                            "without the hub (random text weights, byte tokenizer sized vocab). "
                                            f"{VERBOSE_FLAG} (any position, or CLAP_VERBOSE=1): show Ray's and "
                                            "helper servers' logs and every progress bar")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subcommands = available_subcommands()
    for name, (_, help_text) in subcommands.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    # Import only the chosen subcommand's module, then give it a real parser of its own.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen not in subcommands:
        return parser, None
    module = importlib.import_module(subcommands[chosen][0])
    sub = subparsers.choices[chosen]
    sub.add_argument("-h", "--help", action="help", help="show this help message and exit")
    module.add_arguments(sub)
    return parser, module


OFFLINE_FLAG = "--offline"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if OFFLINE_FLAG in argv:  # any position: `clap --offline pretrain ...` or `clap pretrain ... --offline`
        argv.remove(OFFLINE_FLAG)
        go_offline()
    if VERBOSE_FLAG in argv:  # Ray's and helper servers' logs on the console (pipelines.console)
        argv.remove(VERBOSE_FLAG)
        os.environ[VERBOSE_ENV] = "1"
    parser, module = build_parser(argv)
    if module is None:
        args = parser.parse_args(argv)
    else:  # key=value overrides may come before, between or after the flags
        command = next(a for a in argv if not a.startswith("-"))
        rest = list(argv)
        rest.remove(command)
        args = parser._subparsers._group_actions[0].choices[command].parse_intermixed_args(rest)
        args.command = command
    if module is None:
        parser.print_help()
        return 2 if argv else 0
    try:
        return int(module.run(args) or 0)
    except ConfigError as e:  # a user mistake in a config or override: say which key, no traceback
        print(f"clap {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except StorageAccessError as e:  # bucket missing, credentials or permissions: the URI, no traceback
        print(f"clap {args.command}: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:  # a checkpoint folder that cannot load: its path and the problem, one line
        print(f"clap {args.command}: checkpoint error: {checkpoint_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a job that ran Ray: one line + its log file, which holds the traceback
        if not report_failure(args.command, e):
            raise
        return 1
    finally:
        finish_log()  # the command's log file (pipelines.console): closed, uploaded when the output is s3://


def checkpoint_message(error: CheckpointError) -> str:
    """The CheckpointError's own line, also when Ray wrapped it (an embedding actor raised it)."""
    cause = error
    while getattr(cause, "cause", None) is not None and isinstance(cause.cause, CheckpointError):
        cause = cause.cause
    lines = [x for x in str(cause).splitlines() if x.strip()]
    return lines[-1] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
