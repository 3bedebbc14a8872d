"""The command line as a user runs it: init, token, audit verify, serve with SIGTERM.

``audit verify`` runs on both stores (the suite's ``store_url``); the rest uses the
configuration ``init`` writes, which is SQLite.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg
import pytest

from domum_gateway.cli import main

BIN = [sys.executable, "-m", "domum_gateway.cli"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BIN, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(tmp_path: Path) -> tuple[Path, str]:
    cfg = tmp_path / "config" / "domum.toml"
    out = _run("init", "--config", str(cfg), "--hostname", "gw.example.test", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    tokens = [line[7:] for line in out.stdout.splitlines() if line.startswith("token: ")]
    assert len(tokens) == 1
    return cfg, tokens[0]


def test_init_creates_everything_once_and_is_safe_to_rerun(tmp_path: Path) -> None:
    cfg, token = _init(tmp_path)
    certs = tmp_path / "certs"
    for key in ("ca.key", "gateway.key", "ssh_host_ed25519_key"):
        assert (certs / key).stat().st_mode & 0o777 == 0o600, key
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    config_before = cfg.read_text()
    again = _run("init", "--config", str(cfg), "--hostname", "other.example", cwd=tmp_path)
    assert again.returncode == 0
    assert "token:" not in again.stdout
    assert "kept config" in again.stdout and "kept 1 API token" in again.stdout
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before
    assert cfg.read_text() == config_before
    # The token is stored only as its hash.
    db = tmp_path / "var" / "domum.db"
    assert token.encode() not in db.read_bytes()


def test_config_errors_name_the_key_and_file(tmp_path: Path) -> None:
    cfg, _ = _init(tmp_path)
    cfg.write_text(cfg.read_text().replace("[public]", "[public]\nlisen = 1"))
    out = _run("token", "list", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 2
    assert "public.lisen" in out.stderr and "domum.toml" in out.stderr
    out = _run("token", "list", "--config", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert out.returncode == 2 and "init" in out.stderr


def test_config_from_environment(tmp_path: Path) -> None:
    cfg, _ = _init(tmp_path)
    env = {**os.environ, "DOMUM_CONFIG": str(cfg)}
    out = subprocess.run(
        [*BIN, "token", "list"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.startswith("admin\tadmin")


def test_token_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = _init(tmp_path)
    assert main(["token", "create", "--config", str(cfg), "--role", "auditor", "--name", "audit-1"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("token: dgw_") for line in out.splitlines())
    assert main(["token", "create", "--config", str(cfg), "--role", "auditor", "--name", "audit-1"]) == 2
    assert main(["token", "list", "--config", str(cfg)]) == 0
    listing = capsys.readouterr().out
    assert "audit-1\tauditor" in listing and "dgw_" not in listing
    assert main(["token", "revoke", "--config", str(cfg), "audit-1"]) == 0
    assert main(["token", "revoke", "--config", str(cfg), "audit-1"]) == 1


def _tamper_sql(url: str, statements: list[str]) -> None:
    """Change the database behind the gateway's back, as an attacker with access would."""
    if url.startswith("sqlite:"):
        db = sqlite3.connect(url[len("sqlite:///") :])
        with db:
            for sql in statements:
                db.execute(sql)
        db.close()
        return

    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            async with conn.transaction():
                for sql in statements:
                    await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.mark.parametrize("tamper", ["alter", "delete_middle", "delete_last", "reorder"])
def test_audit_verify_detects_tampering(
    tmp_path: Path, tamper: str, capsys: pytest.CaptureFixture[str], store_url: str
) -> None:
    cfg, _ = _init(tmp_path)
    url = f"sqlite:///{tmp_path}/var/domum.db"
    if not store_url.startswith("sqlite:"):
        # Point the configuration at PostgreSQL; a second init makes the schema and a token.
        text = cfg.read_text()
        assert 'url = "sqlite:///../var/domum.db"' in text
        cfg.write_text(text.replace('url = "sqlite:///../var/domum.db"', f'url = "{store_url}"'))
        again = _run("init", "--config", str(cfg), "--hostname", "gw.example.test", cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        url = store_url
    for i in range(4):
        assert main(["token", "create", "--config", str(cfg), "--role", "auditor", "--name", f"a{i}"]) == 0
    assert main(["audit", "verify", "--config", str(cfg)]) == 0
    assert "intact: 5 events" in capsys.readouterr().out
    statements = {
        "alter": ["UPDATE audit_events SET actor = 'someone-else' WHERE seq = 3"],
        "delete_middle": ["DELETE FROM audit_events WHERE seq = 3"],
        "delete_last": ["DELETE FROM audit_events WHERE seq = 5"],
        "reorder": [
            "UPDATE audit_events SET seq = 100 WHERE seq = 2",
            "UPDATE audit_events SET seq = 2 WHERE seq = 3",
            "UPDATE audit_events SET seq = 3 WHERE seq = 100",
        ],
    }[tamper]
    _tamper_sql(url, statements)
    assert main(["audit", "verify", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    expected = {"alter": 3, "delete_middle": 3, "delete_last": 5, "reorder": 2}[tamper]
    assert f"BROKEN at event {expected}" in out


def test_serve_answers_then_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    cfg, _token = _init(tmp_path)
    admin_port, public_port = _free_port(), _free_port()
    text = cfg.read_text()
    text = text.replace('listen = "127.0.0.1:9443"', f'listen = "127.0.0.1:{admin_port}"')
    text = text.replace('listen = "0.0.0.0:8443"', f'listen = "127.0.0.1:{public_port}"')
    text = text.replace('listen = "0.0.0.0:2222"', 'listen = "127.0.0.1:0"')
    cfg.write_text(text)
    proc = subprocess.Popen(
        [*BIN, "serve", "--config", str(cfg), "--grace", "2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.crt"))
        deadline = time.monotonic() + 30
        body = b""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{admin_port}/healthz", context=ctx, timeout=2
                ) as r:
                    body = r.read()
                    break
            except OSError:
                time.sleep(0.2)
        assert b'"ok"' in body
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "gateway.stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
