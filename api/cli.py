"""The `inferatech` command: the embedded stack, production roles and a thin API client."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from api.cli_client import Api, CliError, resolve_target, save_credentials
from core.settings import ClientEnv

Handler = Callable[[argparse.Namespace], int]


def _exec(argv: list[str]) -> int:
    """Replace this process: the role gets signals and the exit code directly."""
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", *argv])  # noqa: S606 - fixed argv
    return 0  # pragma: no cover - execv does not return


def cmd_up(args: argparse.Namespace) -> int:
    from api.embedded import UpOptions, up

    return up(UpOptions(args.host, args.port, Path(args.data_dir)))


def cmd_api(args: argparse.Namespace) -> int:
    return _exec(
        [
            "uvicorn",
            "--factory",
            "api.main:app_factory",
            "--host",
            args.host,
            "--port",
            str(args.port),
        ]
    )


def cmd_worker(args: argparse.Namespace) -> int:
    argv = ["celery", "-A", "workers.celery_app", "worker", "-Q", args.queues, "-l", "INFO"]
    if "infer" in args.queues.split(","):  # runners are processes: threads share one pool
        argv += ["-P", "threads"]
    return _exec([*argv, "-c", str(args.concurrency), "--without-gossip", "--without-mingle"])


def cmd_beat(_args: argparse.Namespace) -> int:
    from core.settings import get_settings

    data_dir = get_settings().data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    schedule = str(data_dir / "celerybeat-schedule")
    return _exec(["celery", "-A", "workers.celery_app", "beat", "-l", "INFO", "-s", schedule])


def cmd_migrate(_args: argparse.Namespace) -> int:
    from core.db import migrate

    migrate()
    print("database is at the newest revision")
    return 0


def cmd_billing_push(_args: argparse.Namespace) -> int:
    from billing.pusher import push_all
    from core.settings import get_settings

    settings = get_settings()
    if not settings.stripe_configured:
        print("Stripe is not configured (INFERATECH_STRIPE_API_KEY): nothing to push")
        return 0
    report = push_all(settings)
    print(
        f"pushed {report.pushed} · retrying {report.retried} · failed {report.failed} "
        f"· expired {report.expired}"
    )
    for line in report.errors:
        print(f"  {line}")
    return 0


def _when(text: str) -> Any:
    from datetime import UTC, datetime

    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def cmd_billing_reconcile(args: argparse.Namespace) -> int:
    from billing.reconcile import reconcile
    from core.db import session_scope
    from core.settings import get_settings

    settings = get_settings()
    with session_scope(settings) as session:
        drift = reconcile(session, settings, _when(args.start), _when(args.end))
    if not drift:
        print("ledger and Stripe agree for every customer and hour")
        return 0
    rows = [[d.meter, d.customer, d.hour.isoformat(), str(d.ledger), str(d.stripe),
             f"{d.delta:+d}"] for d in drift]  # fmt: skip
    _table(["meter", "customer", "hour", "ledger", "stripe", "drift"], rows)
    return 1


def _api(args: argparse.Namespace, *, need_token: bool = True) -> Api:
    return Api(resolve_target(args.url, getattr(args, "token", None)), need_token=need_token)


def _operator_api(args: argparse.Namespace) -> Api:
    token = args.operator_token or ClientEnv().operator_token
    if not token:
        raise CliError(
            "NO_OPERATOR_TOKEN",
            "linking a Stripe customer is an operator's act: pass --operator-token "
            "or set INFERATECH_OPERATOR_TOKEN",
        )
    return Api(resolve_target(args.url, token))


def cmd_accounts_create(args: argparse.Namespace) -> int:
    body = {"name": args.name}
    if args.stripe_customer:
        api = _operator_api(args)
        body["stripe_customer_id"] = args.stripe_customer
    else:
        api = _api(args, need_token=False)
    account = api.call("POST", "/v1/accounts", body)
    customer = account.get("stripe_customer_id")
    billed = f", billed to {customer}" if customer else ""
    print(f"account {account['id']} ({account['name']}){billed}")
    print(f"token {account['token']} (shown once)")
    if not args.no_save:
        path = ClientEnv().credentials_path()
        save_credentials(path, api.url, account["token"])
        print(f"saved to {path}; later commands use it")
    return 0


def _customer_arg(value: str) -> str | None:
    return None if value == "none" else value


def cmd_accounts_link_customer(args: argparse.Namespace) -> int:
    body = {"stripe_customer_id": _customer_arg(args.customer)}
    path = f"/v1/accounts/{args.account_id}/stripe-customer"
    linked = _operator_api(args).call("PUT", path, body)
    print(f"account {linked['id']} billed to {linked['stripe_customer_id'] or 'nobody'}")
    return 0


def cmd_keys_link_customer(args: argparse.Namespace) -> int:
    body = {"stripe_customer_id": _customer_arg(args.customer)}
    linked = _operator_api(args).call("PUT", f"/v1/keys/{args.key_id}/billed-customer", body)
    who = linked["stripe_customer_id"] or "its account's customer"
    print(f"key {linked['id']} billed to {who}")
    return 0


def cmd_models_upload(args: argparse.Namespace) -> int:
    from api.cli_upload import upload_model

    paths = [Path(p) for p in args.paths]
    return upload_model(_api(args), paths, args.name, wait=not args.no_wait, timeout=args.timeout)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _table(columns: Sequence[str], rows: list[list[str]]) -> None:
    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)


def _model_row(m: dict[str, Any]) -> list[str]:
    return [m["id"], m["name"], m["status"], m.get("format") or "-", _size(m["total_bytes"])]


def cmd_models_list(args: argparse.Namespace) -> int:
    page = _api(args).call("GET", "/v1/models")
    _table(["id", "name", "status", "format", "size"], [_model_row(m) for m in page["data"]])
    return 0


def cmd_models_get(args: argparse.Namespace) -> int:
    from api.cli_upload import verdict_line

    m = _api(args).call("GET", f"/v1/models/{args.model_id}")
    _table(["id", "name", "status", "format", "size"], [_model_row(m)])
    for f in m["files"]:
        print(f"  {f['path']}  {_size(f['size_bytes'])}  {f.get('sha256') or ''}")
    if m["status"] in ("ready", "rejected"):
        print(verdict_line(m))
    return 0


def cmd_models_delete(args: argparse.Namespace) -> int:
    _api(args).call("DELETE", f"/v1/models/{args.model_id}")
    print(f"deleted {args.model_id}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    page = _api(args).call("GET", "/v1/keys")
    rows = [
        [
            k["id"],
            k["name"],
            k["model_id"],
            k["prefix"],
            "revoked" if k.get("revoked_at") else "active",
        ]
        for k in page["data"]
    ]
    _table(["id", "name", "model", "prefix", "state"], rows)
    return 0


KEY_LIMIT_FLAGS = ("rpm", "tpm", "concurrency", "monthly_token_budget")


def cmd_keys_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "log_payloads": args.log_payloads}
    for flag in KEY_LIMIT_FLAGS:
        if (value := getattr(args, flag)) is not None:
            body[flag if flag == "monthly_token_budget" else f"rate_limit_{flag}"] = value
    key = _api(args).call("POST", f"/v1/models/{args.model_id}/keys", body)
    print(f"key {key['id']} for {key['model_id']}: {key['key']} (shown once)")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    _api(args).call("DELETE", f"/v1/keys/{args.key_id}")
    print(f"revoked {args.key_id}")
    return 0


def _client_opts() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--url", help="API base URL (default: $INFERATECH_API_URL or saved)")
    parent.add_argument("--token", help="account token (default: $INFERATECH_TOKEN or saved)")
    return parent


def _operator_opts() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--url", help="API base URL (default: $INFERATECH_API_URL or saved)")
    parent.add_argument("--operator-token", help="default: $INFERATECH_OPERATOR_TOKEN")
    return parent


def _add(sub: Any, name: str, handler: Handler, **kw: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, **kw)
    parser.set_defaults(handler=handler)
    return parser


def _server_commands(sub: Any) -> None:
    up = _add(sub, "up", cmd_up, help="run the whole platform on this machine")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--data-dir", default="./.inferatech")
    api = _add(sub, "api", cmd_api, help="run the API server (production role)")
    api.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a server role in a container
    api.add_argument("--port", type=int, default=8000)
    worker = _add(sub, "worker", cmd_worker, help="run a Celery worker (production role)")
    worker.add_argument("-Q", "--queues", default="validate,background")
    worker.add_argument("-c", "--concurrency", type=int, default=1)
    _add(sub, "beat", cmd_beat, help="run Celery beat (production role)")
    _add(sub, "migrate", cmd_migrate, help="bring the database schema up to date")
    billing = sub.add_parser("billing", help="usage billing (Stripe)").add_subparsers(required=True)
    _add(billing, "push", cmd_billing_push, help="push due usage events to Stripe now")
    rec = _add(billing, "reconcile", cmd_billing_reconcile, help="ledger vs Stripe, per hour")
    rec.add_argument("--from", dest="start", required=True, help="ISO date or time (UTC)")
    rec.add_argument("--to", dest="end", required=True, help="ISO date or time (UTC)")


def _client_commands(sub: Any) -> None:
    opts = _client_opts()
    accounts = sub.add_parser("accounts", help="accounts").add_subparsers(required=True)
    create = _add(accounts, "create", cmd_accounts_create, parents=[opts])
    create.add_argument("--name", required=True)
    create.add_argument("--no-save", action="store_true", help="do not save the token")
    create.add_argument("--stripe-customer", metavar="CUS_ID", help="bill it to (operator)")
    create.add_argument("--operator-token", help="default: $INFERATECH_OPERATOR_TOKEN")
    link = _add(accounts, "link-customer", cmd_accounts_link_customer, parents=[_operator_opts()],
                help="bill an account to a Stripe customer (none: unlink)")  # fmt: skip
    link.add_argument("account_id")
    link.add_argument("customer", metavar="CUS_ID")
    models = sub.add_parser("models", help="models").add_subparsers(required=True)
    upload = _add(models, "upload", cmd_models_upload, parents=[opts])
    upload.add_argument("paths", nargs="+", metavar="PATH")
    upload.add_argument("--name", required=True)
    upload.add_argument("--no-wait", action="store_true", help="do not wait for validation")
    upload.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    _add(models, "list", cmd_models_list, parents=[opts])
    for name, handler in (("get", cmd_models_get), ("delete", cmd_models_delete)):
        _add(models, name, handler, parents=[opts]).add_argument("model_id")
    keys = sub.add_parser("keys", help="API keys").add_subparsers(required=True)
    _add(keys, "list", cmd_keys_list, parents=[opts])
    create_key = _add(keys, "create", cmd_keys_create, parents=[opts])
    create_key.add_argument("model_id")
    create_key.add_argument("--name", default="default")
    for flag, what in (("rpm", "requests per minute"), ("tpm", "tokens per minute"),
                       ("concurrency", "requests in flight")):  # fmt: skip
        create_key.add_argument(
            f"--{flag}", type=int, help=f"{what} (at most the server's default)"
        )
    create_key.add_argument(
        "--monthly-token-budget", type=int, help="tokens a calendar month (UTC)"
    )
    create_key.add_argument("--log-payloads", action="store_true", help="allow payload logging")
    _add(keys, "revoke", cmd_keys_revoke, parents=[opts]).add_argument("key_id")
    bill = _add(keys, "link-customer", cmd_keys_link_customer, parents=[_operator_opts()],
                help="bill a key to another Stripe customer (none: unlink)")  # fmt: skip
    bill.add_argument("key_id")
    bill.add_argument("customer", metavar="CUS_ID")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferatech", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    _server_commands(sub)
    _client_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except CliError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI prints a line, never a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
