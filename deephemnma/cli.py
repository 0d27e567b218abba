"""``deephemnma <command>``: one subcommand per stage.

Each module in :mod:`deephemnma.commands` defines a subcommand with the attributes
``NAME``, ``HELP``, ``DESCRIPTION``, ``EXAMPLES`` (list of example command lines) and
the functions ``add_arguments(parser)``, ``run(args, config) -> int | None`` and,
optionally, ``default_log(args) -> Path | None`` (the log file used when ``--log`` is
not given; typically beside the command's main output).

Every subcommand takes ``--config``, ``--set KEY=VALUE``, ``--log``, ``--threads``,
``-v`` and ``-q``. Errors in the user's input are printed as one line naming the file
(and row) with exit code 2; nothing partial is left behind (writers are atomic).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__
from .core.errors import DeephemnmaError
from .core.logs import get_logger, setup_logging

log = get_logger("cli")


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--config", metavar="YAML", help="configuration file (default: the schema's defaults)")
    g.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one configuration value, e.g. --set nma.cutoff=10 (repeatable)")
    g.add_argument("--log", metavar="FILE",
                   help="log file (default: $DEEPHEMNMA_LOG, else beside the main output)")
    g.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: SLURM_CPUS_PER_TASK or all cores)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="more output")
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def _command_list(mods) -> str:
    from .commands import is_stage

    width = max(len(m.NAME) for m in mods) + 2
    lines = ["pipeline stages, in order:"]
    lines += [f"  {m.NAME:<{width}}{m.HELP}" for m in mods if is_stage(m)]
    lines += ["", "utilities:"]
    lines += [f"  {m.NAME:<{width}}{m.HELP}" for m in mods if not is_stage(m)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .commands import command_modules

    mods = command_modules()
    parser = argparse.ArgumentParser(
        prog="deephemnma",
        description="DeepHEMNMA: continuous conformational landscapes of macromolecules from cryo-EM particles.\n\n"
                    + _command_list(mods),
        epilog="Run 'deephemnma <command> --help' for a command's options and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"deephemnma {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", help=argparse.SUPPRESS)
    for mod in mods:
        examples = "\n".join(f"  {e}" for e in getattr(mod, "EXAMPLES", []))
        p = sub.add_parser(
            mod.NAME,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            epilog=f"example{'s' if len(getattr(mod, 'EXAMPLES', [])) > 1 else ''}:\n{examples}" if examples else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        add_common_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mod = getattr(args, "_module", None)
    if mod is None:
        parser.print_help()
        return 1

    from .core.runtime import set_threads

    args.threads = set_threads(args.threads)
    log_file = args.log or os.environ.get("DEEPHEMNMA_LOG") or None  # the env var passes launchers (horovodrun)
    if log_file is None and hasattr(mod, "default_log"):
        log_file = mod.default_log(args)
    t0 = time.monotonic()
    injected = _injected_failure(argv)
    if injected:
        print(f"error: {injected}", file=sys.stderr)
        return 3
    try:
        setup_logging(log_file, verbose=args.verbose, quiet=args.quiet)
        _check_output_places(args)
        from .core.config import load_config

        config = load_config(args.config, args.overrides)
        log.debug("deephemnma %s %s", __version__, " ".join(sys.argv[1:] if argv is None else argv))
        rc = mod.run(args, config)
    except DeephemnmaError as exc:
        log.debug("failed", exc_info=True)
        msg = f"error: {exc}"
        print(msg, file=sys.stderr)
        _log_to_file_only(msg)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    log.debug("%s finished in %.1f s", mod.NAME, time.monotonic() - t0)
    return int(rc or 0)


#: options that name outputs: their directories must be creatable before any work is done
OUTPUT_OPTIONS = {"out": "file", "outdir": "dir", "summary": "file", "dropped": "file", "plots": "dir"}


def _check_output_places(args) -> None:
    """Fail before any work (one line, exit 2) when an output cannot be written where asked,
    e.g. a folder under a regular file."""
    from .core.errors import InputError

    for name, kind in OUTPUT_OPTIONS.items():
        value = getattr(args, name, None)
        if not isinstance(value, (str, Path)) or not value:
            continue
        folder = Path(value) if kind == "dir" else Path(value).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            where = "" if folder == Path(value) else f" {folder}"
            raise InputError(value, f"cannot create the output directory{where} ({exc.strerror or exc.__class__.__name__})") from None


def _injected_failure(argv) -> str | None:
    """Fault injection for testing retries (workflow tests): with
    ``DEEPHEMNMA_FAIL_ONCE="<text>::<marker file>"``, a command whose arguments contain
    <text> fails once — the first time, creating the marker — and runs normally afterwards."""
    spec = os.environ.get("DEEPHEMNMA_FAIL_ONCE")
    if not spec or "::" not in spec:
        return None
    text, marker = spec.split("::", 1)
    args = " ".join(sys.argv[1:] if argv is None else argv)
    if text and text in args:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return None
        os.close(fd)
        return f"injected failure (DEEPHEMNMA_FAIL_ONCE matched {text!r}; marker {marker})"
    return None


def _log_to_file_only(msg: str) -> None:
    import logging

    for h in logging.getLogger("deephemnma").handlers:
        if isinstance(h, logging.FileHandler):
            h.emit(logging.LogRecord("deephemnma", logging.ERROR, "", 0, msg, None, None))


def entry() -> None:  # pragma: no cover - console script wrapper
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
