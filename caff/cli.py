"""The ``caff`` command line: one subcommand per job, each in its own small module."""

from __future__ import annotations

import argparse
import sys

from caff import calibrate_cmd, certs_cmd, cost_cmd, plan_cmd, pretrain_cmd, train_cmd
from trainer.data import DataUnavailable

SUBCOMMANDS = (cost_cmd, plan_cmd, train_cmd, pretrain_cmd, calibrate_cmd, certs_cmd)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        print(f"caff: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="caff", description="Plan, validate and run federated fine-tuning of tiny Transformers.")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    runners = {}
    for module in SUBCOMMANDS:
        runners.update(module.add_parser(subparsers))
    args = parser.parse_args(argv)
    try:
        return runners[args.command](args)
    except (ValueError, OSError, DataUnavailable) as exc:  # bad input, files, missing data packages
        message = " ".join(str(exc).split())
        print(f"caff: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
