"""``headwater``: trace a model's predictions back to the training examples that caused them.

Commands: ``demo``, ``score``, ``plan``, ``report``, ``bench``. Run ``headwater <command> --help``.
Mistakes in the command line or the user's files, bad data and damaged stores print one
line to stderr and exit with status 2 (``--debug`` shows the full traceback instead);
anything unexpected is a bug: a one-line note, the traceback and status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from headwater.version import __version__

__all__ = ["build_parser", "main"]

EXIT_USER_ERROR = 2
EXIT_BUG = 1
_BUG_NOTE = (
    "headwater: this is a bug, please report it with the traceback below (headwater {version})\n"
)


class _UsageError(Exception):
    """A command line argparse refuses: :func:`main` prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage dump) pointing at this (sub)command's
    ``--help``."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _common_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    g = flags.add_argument_group("output")
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars or log messages (results are still printed)",
    )
    g.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug log messages"
    )
    g.add_argument(
        "--debug",
        "--traceback",
        dest="debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error instead of one line",
    )
    return flags


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and its subcommand parsers by name."""
    from headwater.cli import bench, demo, plan, render, score

    flags = _common_flags()
    parser = _Parser(
        prog="headwater", description=__doc__.split("\n\n")[0].replace("``", ""), parents=[flags]
    )
    parser.add_argument("--version", action="version", version=f"headwater {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    commands = {}
    for module in (demo, score, plan, render, bench):
        p = module.add_parser(sub, [flags])  # the shared flags also work after the command
        commands[p.prog.split()[-1]] = p
    return parser, commands


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    from headwater.cli.common import load_config_defaults

    parser, commands = build_parser()
    if argv[:1] == ["bench"] and not {"-h", "--help"} & set(argv[1:2]):
        # everything after `bench` belongs to bench.run (argparse.REMAINDER drops leading flags)
        from headwater.cli import bench

        return argparse.Namespace(
            command="bench",
            bench_args=argv[1:],
            func=bench.run,
            quiet=False,
            verbose=False,
            debug=False,
        )
    args = _parse_args(parser, commands, argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)
    if getattr(args, "config", None):
        command = commands[args.command]
        command.set_defaults(**load_config_defaults(args.config, args.command, command))
        args = _parse_args(parser, commands, argv)
    for name in ("quiet", "verbose", "debug"):
        setattr(args, name, getattr(args, name, False))
    return args


def _parse_args(
    parser: argparse.ArgumentParser,
    commands: dict[str, argparse.ArgumentParser],
    argv: Sequence[str],
) -> argparse.Namespace:
    """``parser.parse_args``, with arguments the command does not take reported by the command's
    parser (its error points at ``headwater <command> --help``)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        command = commands.get(getattr(args, "command", None) or "", parser)
        command.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``headwater`` console script; returns the exit status: 0, 2 for a
    user's mistake (one line), 1 for a bug (note and traceback), 130 when interrupted."""
    from headwater.cli.common import setup_logging
    from headwater.errors import HeadwaterError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool({"--debug", "--traceback"} & set(argv))
    try:
        args = _parse(argv)
        setup_logging(args.quiet, args.verbose)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("headwater: interrupted\n")
        return 130
    except _UsageError as err:
        sys.stderr.write(f"{err}\n")
        return EXIT_USER_ERROR
    except (
        HeadwaterError,
        ValueError,
        TypeError,
        OSError,
    ) as err:  # OSError: a missing file, a full disk
        if debug:
            raise
        logging.getLogger("headwater").debug("error", exc_info=True)
        sys.stderr.write(f"headwater: error: {_one_line(err)}\n")
        return EXIT_USER_ERROR
    except Exception:
        sys.stderr.write(_BUG_NOTE.format(version=__version__))
        traceback.print_exc()
        return EXIT_BUG


if __name__ == "__main__":
    raise SystemExit(main())
