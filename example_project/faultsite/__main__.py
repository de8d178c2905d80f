"""Command line of the fault site.

Usage: ``python -m faultsite --config site.json --log requests.jsonl --ready ready.json``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

from faultsite.config import ConfigError, load_config, parse_config, parse_host_flag
from faultsite.listeners import BindError
from faultsite.server import RequestLog, Site

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m faultsite",
        description="Serve a fault-injection site on loopback addresses.",
    )
    parser.add_argument("--config", type=Path, help="JSON config file with the site and its hosts")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME=PROFILE[:key=value,...]",
        help="add a host (repeatable), e.g. flaky1=flaky:rate=0.4,address=127.0.0.3",
    )
    parser.add_argument("--log", type=Path, required=True, help="request log to write (JSON lines)")
    parser.add_argument("--ready", type=Path, help="file written once every listener is bound")
    parser.add_argument(
        "--seed", type=int, help="seed of every fault decision (overrides the config)"
    )
    parser.add_argument(
        "--root", help="content: a directory, or 'generated' (overrides the config)"
    )
    parser.add_argument(
        "--pages", type=int, help="page count of the generated site (overrides the config)"
    )
    parser.add_argument(
        "--port", type=int, help="port of every listener, 0 to pick one (overrides the config)"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return parser


def build_raw_config(args: argparse.Namespace) -> dict[str, Any]:
    """Merge the config file and the command-line flags into one raw config object."""
    raw: dict[str, Any] = load_config(args.config) if args.config else {}
    hosts = list(raw.get("hosts") or [])
    hosts.extend(parse_host_flag(flag) for flag in args.host)
    raw["hosts"] = hosts

    overrides = {"seed": args.seed, "root": args.root, "pages": args.pages, "port": args.port}
    raw.update({key: value for key, value in overrides.items() if value is not None})
    return raw


def write_ready_file(path: Path, info: dict[str, Any]) -> None:
    """Write the ready file atomically, so a reader never sees half of it."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def raise_open_file_limit() -> None:
    """Raise the soft limit of open files to the hard limit, for many connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(site: Site, ready_path: Path | None) -> None:
    """Start the site, write the ready file, and serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, site.stop)

    await site.start()
    info = site.ready_info()
    if ready_path is not None:
        write_ready_file(ready_path, info)
    urls = ", ".join(f"{name}={host['url']}" for name, host in info["hosts"].items())
    logger.info("serving %d hosts (pid %d): %s", len(info["hosts"]), info["pid"], urls)

    await site.wait_stopped()
    logger.info("stopped")


def main(argv: list[str] | None = None) -> int:
    """Run the site until it is stopped; return the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s faultsite %(levelname)s: %(message)s",
    )

    try:
        config = parse_config(build_raw_config(args))
    except ConfigError as error:
        print(f"faultsite: invalid config: {error}", file=sys.stderr)
        return 2

    raise_open_file_limit()
    log = RequestLog(args.log)
    try:
        asyncio.run(serve(Site(config, log), args.ready))
    except BindError as error:
        print(f"faultsite: {error.strerror}", file=sys.stderr)
        return 1
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
