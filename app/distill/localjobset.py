"""Local JobSet runner (work in progress)."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rendered", help="helm template output containing one JobSet")


def main(args: argparse.Namespace) -> int:
    raise NotImplementedError("local-jobset is not implemented yet")
