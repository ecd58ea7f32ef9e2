"""The ``ichnode`` command line.

Each sub-command lives in its own module and is imported only when used, so
``ichnode --help`` stays fast (torch is never imported for it).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from config import ICHNODE_VERSION, ConfigError

# sub-command -> "module:function"; each function takes the parsed namespace
# and returns the process exit code.
_COMMANDS: dict[str, str] = {
    "serve": "node.commands.serve:run",
    "analyze": "node.commands.analyze:run",
    "studies": "node.commands.studies:run",
    "outbox": "node.commands.outbox:run",
    "index": "node.commands.index:run",
    "ui": "node.commands.ui:run",
    "train": "inference.train:run_cli",
    "evaluate": "inference.evaluate:run_cli",
    "crossval": "inference.crossval:run_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ichnode",
        description="DICOM node that finds intracranial hemorrhage in head CT.",
    )
    parser.add_argument("--version", action="version", version=f"ichnode {ICHNODE_VERSION}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the node in the foreground until SIGTERM/SIGINT")
    p.add_argument("--config", help="TOML configuration file (default: embedded defaults)")
    p.add_argument(
        "--role",
        action="append",
        metavar="ROLE[,ROLE]",
        help="run only these roles: receiver, scheduler, worker, sender (repeatable or "
        "comma-separated; default: all); processes with different roles share one "
        "PostgreSQL index and one archive folder (docs/DEPLOY.md)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="this process's metrics endpoint port instead of metrics.port (0: none)",
    )

    p = sub.add_parser("analyze", help="analyse DICOM files or folders, no database or network")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--out", help="folder for the SEG/SR/SC objects")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--weights", default="", help="weights file (default: bundled)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32"],
        help="auto: float16 autocast on CUDA, bfloat16 on CPUs with AMX",
    )

    p = sub.add_parser("studies", help="list what the index holds")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("outbox", help="deliveries and their state")
    p.add_argument("--config")
    p.add_argument("action", choices=["list", "retry"])
    p.add_argument("id", nargs="?", type=int)

    p = sub.add_parser("index", help="the index database: copy it into an empty one")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser(
        "copy",
        help="copy every row of the index into an empty PostgreSQL (or SQLite) database, "
        "with the node stopped",
    )
    a.add_argument("--config")
    a.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="the empty target: postgresql+psycopg://USER@HOST:PORT/DATABASE or sqlite:///PATH",
    )
    a.add_argument(
        "--force",
        action="store_true",
        help="copy even when associations are open or jobs running in the index "
        "(left by a crash; the node must be stopped)",
    )

    p = sub.add_parser("ui", help="start the web interface")
    p.add_argument("--config")
    p.add_argument("--port", type=int, default=8501)

    p = sub.add_parser("train", help="train the hemorrhage network")
    _add_lazy_args(p, "inference.train:add_arguments")
    p = sub.add_parser("evaluate", help="evaluate weights on held-out data")
    _add_lazy_args(p, "inference.evaluate:add_arguments")
    p = sub.add_parser(
        "crossval", help="patient-level k-fold cross-validation on real CT (CT-ICH)"
    )
    _add_lazy_args(p, "inference.crossval:add_arguments")
    return parser


def _add_lazy_args(parser: argparse.ArgumentParser, target: str) -> None:
    """Let a module add its own arguments (it must import nothing heavy at import time)."""
    module_name, func = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    getattr(module, func)(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module_name, func = _COMMANDS[args.command].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(f"ichnode {args.command}: not available in this build ({exc.name})", file=sys.stderr)
        return 2
    try:
        return int(getattr(module, func)(args))
    except ConfigError as exc:
        print(f"ichnode: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
