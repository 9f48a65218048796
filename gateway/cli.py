"""The ``dicom-gateway`` command: the only place that prints for users and picks exit codes.

Exit codes: 0 success, 1 the operation failed (peer down, bad job), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path

from gateway import __version__
from gateway.config import DEFAULT_CONFIG_PATH, Config, load
from gateway.logsafe import OneLineFormatter
from gateway.errors import ConfigError, DataDirInUse, GatewayError, UnknownDestination

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("gateway")


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """One line per event on stderr, from our own modules (library chatter only at DEBUG)."""
    import pydicom  # noqa: F401  (its import sets its logger's level: ours must come after)

    from gateway.logfmt import JsonFormatter, TEXT_DATEFMT, TEXT_FORMAT

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else OneLineFormatter(TEXT_FORMAT, TEXT_DATEFMT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs each refused connection or bad PDU as several ERROR lines; our own
    # modules already log one line per outcome, so its chatter shows only at DEBUG.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
    logging.getLogger("pydicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
    # pydicom warns (warnings.warn) about each invalid value a peer sends; we already log
    # one line for the refusal, so these show only at DEBUG too.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # httpx logs every request at INFO; the DICOMweb sender logs one line per outcome itself.
    # httpcore's trace lines stay off even at DEBUG: no chance of a header with a token in a log.
    logging.getLogger("httpx").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # "skipped: maximum number of running instances" each poll while a long batch runs: normal
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)


def _load(args) -> Config:
    return load(args.config)


def cmd_check_config(args) -> int:
    config = _load(args)
    print(f"{args.config}: OK ({len(config.destinations)} destination(s), data in {config.node.data_dir})")
    from gateway import status

    for warning in status.security_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def cmd_run(args) -> int:
    config = _load(args)
    setup_logging(config.logging.level, config.logging.format)
    from gateway import service

    return service.run(config)


def cmd_echo(args) -> int:
    config = _load(args)
    from gateway.forward.echo import echo

    start = time.monotonic()
    what = echo(config, args.destination)
    kind, _, rest = what.partition(": ")
    print(f"{kind} {args.destination}: {rest} in {1000 * (time.monotonic() - start):.0f} ms")
    return EXIT_OK


def cmd_status(args) -> int:
    config = _load(args)
    from gateway import status

    if args.watch:
        return _watch_status(config, args)
    report = status.collect(config, now=time.time())
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(status.render(report))
    return EXIT_OK


def _watch_status(config: Config, args) -> int:
    """Redraw ``status`` every ``--interval`` seconds until Ctrl-C (JSON: one object per line)."""
    from gateway import status

    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                report = status.collect(config, now=time.time())
            except sqlite3.OperationalError:  # the database is being created or migrated right now
                time.sleep(args.interval)
                continue
            if args.json:
                print(json.dumps(report, sort_keys=True), flush=True)
            elif tty:
                stamp = time.strftime("%H:%M:%S")
                sys.stdout.write("\x1b[H\x1b[2J" + status.render(report)
                                 + f"\n\n{stamp}, every {args.interval:g}s; Ctrl-C to stop\n")
                sys.stdout.flush()
            else:
                print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n{status.render(report)}\n", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_retry(args) -> int:
    config = _load(args)
    from gateway.storage import db, queue
    from gateway.dimse import scu

    if args.destination is not None:
        scu.destination(config, args.destination)  # refuse unknown names
    from gateway.storage import series

    conn = db.connect(config.db_path)
    hooks = 0
    try:
        with db.transaction(conn):
            n = queue.retry_failed(conn, args.destination, time.time())
            if args.destination is None:
                hooks = series.retry_failed_webhooks(conn, time.time())
    finally:
        conn.close()
    which = args.destination or "all destinations"
    print(f"{n} failed item(s) of {which} back to pending")
    if hooks:
        print(f"{hooks} failed webhook(s) back to pending")
    return EXIT_OK


def cmd_send(args) -> int:
    config = _load(args)
    setup_logging(config.logging.level, config.logging.format)
    from gateway import progress
    from gateway.storage import sendfiles

    paths = [Path(p) for p in args.paths]
    bar = None
    if sys.stderr.isatty():  # a bar for a person watching; scripts and logs get the summary only
        bar = progress.Progress(sys.stderr, *sendfiles.count_files(paths),
                                width=shutil.get_terminal_size().columns)
        logging.getLogger("gateway.sendfiles").setLevel(logging.WARNING)  # the bar replaces them
    start = time.monotonic()
    try:
        report = sendfiles.queue_files(config, args.destination, paths, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    for problem in report.problems:
        print(problem, file=sys.stderr)
    print(progress.summary(report.queued, len(report.problems), args.destination, report.nbytes,
                           time.monotonic() - start))
    return EXIT_OK if report.queued and not report.problems else EXIT_FAILED


def cmd_route(args) -> int:
    config = _load(args)
    from gateway.routing import dryrun

    called = args.called_ae if args.called_ae is not None else config.node.ae_title
    report = dryrun.explain(config, [Path(p) for p in args.paths], args.calling_ae, called)
    for line in report.lines:
        print(line)
    for problem in report.problems:
        print(problem, file=sys.stderr)
    return EXIT_OK if report.files and not report.problems else EXIT_FAILED


def cmd_encode(args) -> int:
    from gateway.inbox import offline

    out = offline.encode_offline(args.array, args.sidecar, args.source, args.output,
                                 keep_empty_frames=args.keep_empty_frames)
    print(f"wrote {out.path}: {out.summary}")
    return EXIT_OK


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0.1 and 3600 seconds, got {text}")
    return value


def cmd_hash_secret(args) -> int:
    import getpass

    from gateway.web.hashing import hash_secret

    if sys.stdin.isatty():
        secret = getpass.getpass("secret (not shown): ")
    else:
        secret = sys.stdin.read(64 * 1024).removesuffix("\n").removesuffix("\r")
    try:
        print(hash_secret(secret))
    except ValueError as exc:
        print(f"dicom-gateway: {exc}; pass the token or password on stdin", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        metavar="PATH",
        help=f"YAML config file (default: {DEFAULT_CONFIG_PATH}, relative to the working directory)",
    )
    parser = argparse.ArgumentParser(
        prog="dicom-gateway",
        description="DICOM gateway: receive over C-STORE, turn AI arrays into DICOM SEG/SC, "
        "forward to PACS.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "run", parents=[common], help="run the gateway in the foreground (SIGTERM/SIGINT stop it)",
        description="Run the SCP, the inbox poll and the forward senders until SIGTERM or SIGINT.",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "check-config", parents=[common], help="validate the config file and exit",
        description="Validate the config file; print every mistake as 'key.path: reason, got value' "
        "and exit 2, or exit 0 when it is valid.",
    )
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "echo", parents=[common], help="check a destination: C-ECHO, or a QIDO-RS query for DICOMweb",
        description="Check a destination from the config: a C-ECHO (type dimse), or for a DICOMweb "
        "destination a QIDO-RS GET {url}/studies?limit=1 with its credentials. Exit 0 when it "
        "answers, 1 with what failed otherwise (DNS/connect, TLS, auth, or the server's status).",
    )
    p.add_argument("destination", metavar="DEST", help="a name under 'destinations' in the config")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser(
        "status", parents=[common], help="what is stored, queued, sent and failed",
        description="Show stored studies/series/instances, inbox jobs, and per destination the "
        "queue counts, oldest pending age and last error.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (stable keys, see README)")
    p.add_argument("--watch", action="store_true",
                   help="refresh every --interval seconds until Ctrl-C (with --json: one object per line)")
    p.add_argument("--interval", type=_interval, default=2.0, metavar="SECONDS",
                   help="seconds between refreshes with --watch (default 2)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "retry", parents=[common], help="put failed queue items back to pending",
        description="Put failed items of one destination (or of all) back to pending with their "
        "attempts reset; a running gateway sends them on its next pass.",
    )
    p.add_argument("destination", metavar="DEST", nargs="?", help="only this destination")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser(
        "send", parents=[common], help="queue DICOM files or folders for a destination",
        description="Store the given DICOM files (folders are searched recursively) and queue them "
        "for DEST; a running gateway sends them.",
    )
    p.add_argument("destination", metavar="DEST", help="a name under 'destinations' in the config")
    p.add_argument("paths", metavar="PATH", nargs="+", help="DICOM file or folder")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser(
        "route", parents=[common], help="dry run: which rules and triggers match these files",
        description="Read the headers of the given DICOM files (folders recursively) and print, "
        "for each, which routing rules and triggers match, which do not and why (the first "
        "condition that failed, with the value found), and the destinations it would be queued "
        "for if it were received over DICOM. Nothing is stored or sent; no daemon needed. Exit 0 "
        "when every file was read, 1 when some could not be.",
    )
    p.add_argument("paths", metavar="FILE_OR_FOLDER", nargs="+", help="DICOM file or folder")
    p.add_argument("--calling-ae", metavar="AET", default=None,
                   help="the calling AE title to assume (default: none, as for files)")
    p.add_argument("--called-ae", metavar="AET", default=None,
                   help="the called AE title to assume (default: node.ae_title)")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser(
        "encode", help="derive a SEG/SC from an array offline, no daemon",
        description="Do the inbox's derivation offline: read ARRAY (.npy/.npz) and its sidecar, "
        "find the source series in DICOM_FOLDER, write the derived object to OUT.dcm.",
    )
    p.add_argument("array", type=Path, metavar="ARRAY", help=".npy or .npz file")
    p.add_argument("--sidecar", type=Path, required=True, metavar="YAML", help="the job's sidecar")
    p.add_argument("--source", type=Path, required=True, metavar="DICOM_FOLDER",
                   help="folder holding the source series")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.dcm")
    p.add_argument("--keep-empty-frames", action="store_true",
                   help="SEG: keep frames with no segmented pixel (as inbox.keep_empty_frames: true)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser(
        "hash-secret", help="print the salted hash of a token or password read from stdin",
        description="Read one secret (an API token or a Basic password) from stdin (one trailing "
        "newline is dropped) and print its salted scrypt hash for http.auth.tokens[].hash or "
        "http.auth.users[].hash. The secret itself never goes into the config.",
    )
    p.set_defaults(func=cmd_hash_secret)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ctrl-C stops every command (130 below; ``run`` and ``status --watch`` end cleanly) even
    # when started with SIGINT ignored: a background job of a shell without job control
    # inherits that, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except (UnknownDestination, DataDirInUse) as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GatewayError as exc:
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line for the user, the traceback only at DEBUG
        log.debug("unexpected error", exc_info=True)
        print(f"dicom-gateway: unexpected error: {exc!r}; please report it "
              "(logging.level: DEBUG shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
