"""The ``adw-agent`` command line.

Exit codes: 0 success, 1 failure (unhealthy, a file that cannot be read or written, an agent
error; always one line on stderr, never a traceback), 2 usage error, 78 configuration error
(EX_CONFIG; systemd's ``RestartPreventExitStatus=78`` keeps a bad config from restarting in a
loop; a second agent on the same ``storage.dir`` is one too).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from agent import __version__, boot
from agent.config import Config, load, preflight
from agent.errors import AgentError, ConfigError

EX_CONFIG = 78


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _config(args: argparse.Namespace, check: bool = True) -> Config:
    config = load(Path(args.config))
    if check:
        preflight(config)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    # A stop or reload request that arrives while the agent is still starting must not kill
    # it: the entry point (agent.boot) remembers them until the loop runs; called otherwise,
    # start remembering now.
    early: list[int] = args.early_signals if args.early_signals is not None else boot.install()
    from agent import app, logs  # noqa: PLC0415  (keeps light commands fast)

    config = _config(args)
    logs.setup(
        config.log.level,
        config.adw_id,
        config.token.get_secret_value() if config.token else None,
    )
    problem = config.token_file_problem()
    if problem:
        logging.getLogger("adw_agent.config").warning("%s", problem)
    return app.run(config, early)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    _print_json(config.redacted())
    problem = config.token_file_problem()
    if problem:
        print(f"warning: {problem}", file=sys.stderr)
    print(f"config OK: {config.source}", file=sys.stderr)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from agent.schemas import check_schemas, write_schemas  # noqa: PLC0415

    out = Path(args.out)
    if args.check:
        stale = check_schemas(out)
        for name in stale:
            print(f"schema out of date: {out / name}", file=sys.stderr)
        return 1 if stale else 0
    for path in write_schemas(out):
        print(path)
    return 0


def cmd_receive(args: argparse.Namespace) -> int:
    from agent.receiver import Receiver  # noqa: PLC0415

    try:
        receiver = Receiver(args.port, args.host, Path(args.out) if args.out else None)
    except OSError as exc:
        raise AgentError(f"cannot listen on {args.host}:{args.port}: {_reason(exc)}") from None
    print(f"receiving on {receiver.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        receiver.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        receiver.server.server_close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agent import demo, logs  # noqa: PLC0415

    # The demo prints the events; warnings about its simulated failure would be noise.
    logs.setup("error")
    return demo.run(args.duration, args.linger)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from adw_backend import serve  # noqa: PLC0415  (an optional extra)
        from adw_backend.errors import SettingsError  # noqa: PLC0415
        from adw_backend.settings import load_settings  # noqa: PLC0415
    except ImportError as exc:
        print(
            f"adw-agent serve: the backend is not installed ({exc.name} is missing); "
            "install it with: pip install 'adw-agent[backend]'",
            file=sys.stderr,
        )
        return 1
    try:
        settings = load_settings(
            database_url=args.database,
            token_file=Path(args.token_file) if args.token_file else None,
            read_token_file=Path(args.read_token_file) if args.read_token_file else None,
        )
        return serve.run(settings, args.host, args.port, args.log_level)
    except SettingsError as exc:
        print(f"adw-agent serve: config error: {exc}", file=sys.stderr)
        return EX_CONFIG


def cmd_cost(args: argparse.Namespace) -> int:
    from agent.account import PriceTable, cost_of_path  # noqa: PLC0415
    from agent.report import cost_report, print_cost_table  # noqa: PLC0415

    path = Path(args.path)
    if not path.exists():
        print(f"adw-agent cost: {path}: no such file or directory", file=sys.stderr)
        return 1
    prices = PriceTable.from_config(_config(args, check=False).cost) if args.config else None
    costs = cost_of_path(path, prices or PriceTable())
    report = cost_report(costs)
    if args.json:
        _print_json(report)
    else:
        print_cost_table(report)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.report import print_status, status_report  # noqa: PLC0415

    report = status_report(_config(args, check=False))
    if args.json:
        _print_json(report)
    else:
        print_status(report)
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    from agent.report import health  # noqa: PLC0415

    config = _config(args, check=False)
    try:
        problem = health(config, args.max_stuck, time.time())
    except AgentError as exc:
        problem = str(exc)
    if problem:
        print(f"unhealthy: {problem}")
        return 1
    print("healthy")
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from agent.report import dead_letters  # noqa: PLC0415

    config = _config(args, check=False)
    requeueing = args.requeue is not None or args.all
    result = dead_letters(config, args.requeue, args.all)
    if args.json:
        _print_json(result)
    elif requeueing:
        print(f"requeued {result['requeued']} event(s)")
    else:
        _print_dead(result)
    if args.requeue is not None and not result["requeued"]:
        print(f"adw-agent: no dead letter with seq {args.requeue}", file=sys.stderr)
        return 1
    return 0


def cmd_recover_store(args: argparse.Namespace) -> int:
    from agent.outbox import recover_store  # noqa: PLC0415

    config = _config(args, check=False)
    moved = recover_store(config.storage.dir)
    if moved is None:
        print(f"no store in {config.storage.dir}: nothing to recover")
    else:
        print(f"moved the store to {moved}; the next start begins a new one, with new epochs")
    return 0


def _print_dead(result: dict[str, Any]) -> None:
    rows = result["dead_letters"]
    if not rows:
        print("no dead letters")
        return
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["failed_at"]))
        print(
            f"seq {row['seq']:<6} {row['adw_id']:<14} {row['type']:<16} {row['status']}  "
            f"{when}Z  {row['response'][:80]}"
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adw-agent",
        description="Watch an ADW run directory and deliver its changes as events.",
    )
    p.add_argument("--version", action="version", version=f"adw-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help, description=help)
        cmd.add_argument("--config", "-c", required=True, help="the agent's TOML file")
        return cmd

    with_config("run", "run the agent").set_defaults(func=cmd_run)
    with_config("check-config", "validate the config and print it, secrets redacted").set_defaults(
        func=cmd_check_config
    )
    schema = sub.add_parser("schema", help="write the JSON Schemas of the state and events")
    schema.add_argument("--out", default="schemas", help="directory (default: schemas)")
    schema.add_argument("--check", action="store_true", help="fail if the files are out of date")
    schema.set_defaults(func=cmd_schema)

    receive = sub.add_parser("receive", help="run a local receiver that prints events")
    receive.add_argument("--port", type=int, default=8002)
    receive.add_argument("--host", default="127.0.0.1")
    receive.add_argument("--out", help="append each event to this JSON-lines file")
    receive.set_defaults(func=cmd_receive)

    serve = sub.add_parser("serve", help="run the backend: store events, serve the live page")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8003, help="0 picks a free port")
    serve.add_argument(
        "--database",
        help="sqlite:///FILE (default sqlite:///adw-backend.db) or postgresql://…; "
        "also ADW_BACKEND_DATABASE_URL",
    )
    serve.add_argument("--token-file", help="write tokens, one per line (also read)")
    serve.add_argument("--read-token-file", help="read-only tokens: GET and WebSocket")
    serve.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="run everything on a built-in simulated workflow")
    demo.add_argument("--duration", type=float, default=8.0, help="seconds (at most 55)")
    demo.add_argument(
        "--linger",
        type=float,
        default=0.0,
        metavar="S",
        help="keep serving the live page S seconds after the simulation",
    )
    demo.set_defaults(func=cmd_demo)

    cost = sub.add_parser("cost", help="cost of a transcript or a run directory, offline")
    cost.add_argument("path")
    cost.add_argument("--json", action="store_true")
    cost.add_argument("--config", "-c", help="take price overrides from this config")
    cost.set_defaults(func=cmd_cost)

    status = with_config("status", "show the outbox, deliveries, dead letters and costs")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    health = with_config("healthcheck", "exit 0 if the agent is alive and delivering")
    health.add_argument(
        "--max-stuck",
        type=float,
        default=600.0,
        help="seconds the oldest undelivered event may wait (default 600)",
    )
    health.set_defaults(func=cmd_healthcheck)

    dead = with_config("dead-letters", "list dead-lettered events, or requeue them")
    group = dead.add_mutually_exclusive_group()
    group.add_argument("--requeue", type=int, metavar="SEQ", help="requeue one event by seq")
    group.add_argument("--all", action="store_true", help="requeue every dead letter")
    dead.add_argument("--json", action="store_true")
    dead.set_defaults(func=cmd_dead_letters)
    with_config(
        "recover-store", "move a damaged store aside; the next start begins a new one"
    ).set_defaults(func=cmd_recover_store)
    return p


def main(argv: Sequence[str] | None = None, early_signals: list[int] | None = None) -> int:
    """Run one command. ``early_signals``: the signals :mod:`agent.boot` has been remembering
    since the process started (None when called otherwise)."""
    args = parser().parse_args(argv)
    args.early_signals = early_signals
    if early_signals is not None and args.command != "run":
        boot.restore()
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"adw-agent: config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except AgentError as exc:
        print(f"adw-agent: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path that cannot be read or written: say which, and why
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"adw-agent: {where}{_reason(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
