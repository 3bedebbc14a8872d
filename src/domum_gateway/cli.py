"""Command line: ``domum-gateway init | serve | token | audit``.

Exit codes: 0 success, 1 a check failed (e.g. the audit chain is broken), 2 bad usage or
configuration, 3 the store could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .audit import AuditEntry, verify_chain
from .auth.secrets import hash_secret, new_api_token
from .clock import SystemClock
from .config_template import render_config
from .errors import ConfigError, Conflict, DomumError, StoreError
from .model import Role
from .pki import ensure_ca, ensure_leaf, ensure_ssh_host_key
from .settings import Settings, load_settings, resolve_config_path

__all__ = ["main"]

log = logging.getLogger("domum.cli")


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        stream=sys.stderr,
    )
    # aiohttp's access log would write request paths (which hold personal links).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _say(text: str) -> None:
    print(text, flush=True)


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(resolve_config_path(args.config))


# init --------------------------------------------------------------------------
async def _init(args: argparse.Namespace) -> int:
    path = resolve_config_path(args.config)
    if path.exists():
        _say(f"kept config {path}")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_config(args.hostname), encoding="utf-8")
        _say(f"wrote config {path}")
    settings = load_settings(path)
    tls = settings.tls
    ca_key = tls.ca.with_suffix(".key")
    _report(ensure_ca(tls.ca, ca_key), "CA certificate", tls.ca)
    _report(ensure_leaf(tls.cert, tls.key, tls.ca, ca_key, args.hostname), "TLS certificate", tls.cert)
    _report(ensure_ssh_host_key(settings.ssh.host_key), "SSH host key", settings.ssh.host_key)
    settings.outbox.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    from .app import build_store

    store = build_store(settings)
    await store.open()
    try:
        tokens = await store.list_api_tokens()
        if any(t.revoked_at is None for t in tokens):
            _say(f"kept {sum(t.revoked_at is None for t in tokens)} API token(s) in the database")
        else:
            token = new_api_token()
            now = SystemClock().now()
            await store.create_api_token(
                "admin",
                Role.ADMIN,
                hash_secret(token),
                now,
                AuditEntry(
                    actor="cli:init", action="token.created", subject="token:admin", details={"role": "admin"}
                ),
            )
            _say("created admin API token 'admin' (shown once; store it now):")
            _say(f"token: {token}")
        _say(f"database ready ({store.kind}, schema version {await store.schema_version()})")
    finally:
        await store.close()
    return 0


def _report(created: bool, what: str, where: Path) -> None:
    _say(f"{'created' if created else 'kept'} {what} {where}")


# serve -------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    settings = _load(args)
    try:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        loop_name = "asyncio"
    log.info("serve.starting version=%s loop=%s config=%s", __version__, loop_name, settings.path)

    async def run() -> None:
        from .app import Gateway

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        gateway = Gateway(settings, grace=args.grace)
        await gateway.start()
        _say(f"public:  {gateway.url('public')}  (links: {settings.public.base_url}/a/...)")
        _say(f"admin:   {gateway.url('admin')}/api/v1  metrics: {gateway.url('admin')}/metrics")
        _say(f"console: {gateway.url('admin')}/admin  (sign in with an admin or auditor API token)")
        _say(
            f"ssh:     port {gateway.ssh_port()}  (ssh -J you@example.com@HOST:{gateway.ssh_port()} me@host)"
        )
        try:
            await stop.wait()
            log.info("serve.stopping grace=%s", args.grace)
        finally:
            await gateway.stop()

    asyncio.run(run())
    return 0


# token -------------------------------------------------------------------------
async def _token(args: argparse.Namespace) -> int:
    from .app import build_store

    settings = _load(args)
    store = build_store(settings)
    await store.open()
    try:
        now = SystemClock().now()
        if args.token_cmd == "create":
            token = new_api_token()
            try:
                await store.create_api_token(
                    args.name,
                    Role(args.role),
                    hash_secret(token),
                    now,
                    AuditEntry(
                        actor="cli",
                        action="token.created",
                        subject=f"token:{args.name}",
                        details={"role": args.role},
                    ),
                )
            except Conflict as exc:
                print(f"error: {exc.detail}", file=sys.stderr)
                return 2
            _say(f"created {args.role} API token {args.name!r} (shown once; store it now):")
            _say(f"token: {token}")
        elif args.token_cmd == "list":
            for t in await store.list_api_tokens():
                state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
                _say(f"{t.name}\t{t.role.value}\t{t.created_at:%Y-%m-%d %H:%M}\t{state}")
        elif args.token_cmd == "revoke":
            ok = await store.revoke_api_token(
                args.name,
                now,
                AuditEntry(actor="cli", action="token.revoked", subject=f"token:{args.name}"),
            )
            if not ok:
                print(f"error: no active token named {args.name!r}", file=sys.stderr)
                return 1
            _say(f"revoked API token {args.name!r}")
    finally:
        await store.close()
    return 0


# audit -------------------------------------------------------------------------
async def _audit(args: argparse.Namespace) -> int:
    from .app import build_store

    settings = _load(args)
    store = build_store(settings)
    await store.open()
    try:
        events = await store.all_audit()
        head = await store.audit_head()
    finally:
        await store.close()
    brk = verify_chain(events, head)
    if brk is not None:
        _say(f"audit chain BROKEN at event {brk.seq}: {brk.problem}")
        return 1
    _say(f"audit chain intact: {len(events)} events")
    return 0


# purge -------------------------------------------------------------------------
async def _purge(args: argparse.Namespace) -> int:
    from .app import build_store
    from .bus import Bus
    from .control.retention import Retention
    from .control.service import Actor

    settings = _load(args)
    store = build_store(settings)
    await store.open()
    try:
        retention = Retention(store, SystemClock(), Bus(), settings.retention.days)
        users = await retention.purge(Actor("cli:purge"), dry_run=args.dry_run)
    finally:
        await store.close()
    verb = "would purge" if args.dry_run else "purged"
    _say(
        f"{verb} personal data of {len(users)} user(s) (grants ended over {settings.retention.days} days ago)"
    )
    for u in users:
        _say(f"  {u.id}\t{u.name}\t{u.email or u.phone or ''}")
    return 0


# evidence ----------------------------------------------------------------------
def _evidence(args: argparse.Namespace) -> int:
    import json

    from .control.evidence import load_verify_key, verify_bundle

    try:
        bundle = json.loads(Path(args.file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    key = None
    if args.key:
        try:
            key = load_verify_key(Path(args.key).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"error: cannot use key {args.key}: {exc}", file=sys.stderr)
            return 2
    problem = verify_bundle(bundle, key)
    if problem is not None:
        _say(f"evidence INVALID: {problem.where}: {problem.problem}")
        return 1
    chain = bundle["chain"]
    _say(
        f"evidence valid: request {bundle['request'].get('id')}, {len(bundle['timeline'])} timeline events, "
        f"chain {chain['from_seq']}..{chain['to_seq']} intact, signed by {bundle['signature']['fingerprint']}"
    )
    if key is None:
        _say(
            "note: signature checked against the key inside the file; pass "
            "--key certs/ssh_host_ed25519_key.pub to prove it came from your gateway"
        )
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="domum-gateway", description="Domum Gateway: time-boxed, audited remote access."
    )
    p.add_argument("--version", action="version", version=f"domum-gateway {__version__}")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", help="config file (default: $DOMUM_CONFIG or config/domum.toml)")
        return sp

    init = with_config(
        sub.add_parser("init", help="write config, certificates, SSH host key, database, admin token")
    )
    init.add_argument("--hostname", default="localhost", help="name users reach the gateway by")
    serve = with_config(sub.add_parser("serve", help="run the gateway"))
    serve.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get at shutdown")

    token = sub.add_parser("token", help="manage control API tokens")
    tsub = token.add_subparsers(dest="token_cmd", required=True)
    tc = with_config(tsub.add_parser("create", help="create a token (printed once)"))
    tc.add_argument("--role", choices=[r.value for r in Role], required=True)
    tc.add_argument("--name", required=True)
    with_config(tsub.add_parser("list", help="list tokens (never their values)"))
    tr = with_config(tsub.add_parser("revoke", help="revoke a token"))
    tr.add_argument("name")

    from .tunnel_client import add_connect_arguments

    add_connect_arguments(
        sub.add_parser("connect", help="reach an RDP/TCP target through the gateway on a local port")
    )

    audit = sub.add_parser("audit", help="audit log tools")
    asub = audit.add_subparsers(dest="audit_cmd", required=True)
    with_config(asub.add_parser("verify", help="check the hash chain"))

    purge = with_config(sub.add_parser("purge", help="purge personal data past retention.days"))
    purge.add_argument("--dry-run", action="store_true", help="only show who would be purged")

    evidence = sub.add_parser("evidence", help="evidence bundle tools")
    esub = evidence.add_subparsers(dest="evidence_cmd", required=True)
    ev = esub.add_parser("verify", help="check a bundle's signature and chain offline")
    ev.add_argument("file")
    ev.add_argument("--key", help="the gateway's public key (certs/ssh_host_ed25519_key.pub)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        if args.cmd == "init":
            return asyncio.run(_init(args))
        if args.cmd == "serve":
            return _serve(args)
        if args.cmd == "token":
            return asyncio.run(_token(args))
        if args.cmd == "audit":
            return asyncio.run(_audit(args))
        if args.cmd == "connect":
            from .tunnel_client import connect_main

            return connect_main(args)
        if args.cmd == "purge":
            return asyncio.run(_purge(args))
        if args.cmd == "evidence":
            return _evidence(args)
    except ConfigError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 3
    except DomumError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
