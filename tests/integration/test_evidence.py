"""Evidence bundles: signed, chain-checked offline with `domum-gateway evidence verify`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domum_gateway.cli import main
from domum_gateway.pki import ensure_ssh_host_key

from ..conftest import Running
from .helpers import call, create_forwarded, login_direct, seed

pytestmark = pytest.mark.asyncio


async def test_evidence_bundle_verifies_offline_and_detects_edits(
    running: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = running.gateway.settings.ssh.host_key
    ensure_ssh_host_key(key)
    sd = await seed(running)
    rid, link = await create_forwarded(running, sd)
    await login_direct(running, sd, link)
    async with running.admin() as s:
        st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
        assert st == 200
        st, bundle = await call(s, "GET", f"/api/v1/access-requests/{rid}/evidence")
        assert st == 200, bundle
    actions = [e["action"] for e in bundle["chain"]["events"] if e["seq"] in bundle["timeline"]]
    for expected in (
        "request.saved",
        "request.forwarded",
        "token.sent",
        "session.started",
        "login.succeeded",
        "request.revoked",
    ):
        assert expected in actions, actions
    assert bundle["request"]["created_by"] == "token:admin"
    assert bundle["sessions"] and bundle["sessions"][0]["end_reason"] == "revoked"
    assert "alice@example.com" not in json.dumps(bundle["chain"])

    path = tmp_path / "evidence.json"
    path.write_text(json.dumps(bundle))
    pub = str(key) + ".pub"
    assert main(["evidence", "verify", str(path), "--key", pub]) == 0
    assert "evidence valid" in capsys.readouterr().out

    tampered = json.loads(path.read_text())
    tampered["request"]["justification"] = "something else"
    path.write_text(json.dumps(tampered))
    assert main(["evidence", "verify", str(path), "--key", pub]) == 1
    assert "signature" in capsys.readouterr().out

    # Re-signed by someone else's key: integrity alone passes, origin with --key fails.
    from domum_gateway.control.evidence import load_signing_key

    other = tmp_path / "other_key"
    ensure_ssh_host_key(other)
    forged = dict(bundle)
    forged.pop("signature")
    from cryptography.hazmat.primitives import serialization

    from domum_gateway.audit import canonical_json

    okey = load_signing_key(other)
    import base64

    forged["signature"] = {
        "alg": "ed25519",
        "public_key": okey.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode(),
        "fingerprint": "x",
        "value": base64.b64encode(okey.sign(canonical_json(forged).encode())).decode(),
    }
    path.write_text(json.dumps(forged))
    assert main(["evidence", "verify", str(path)]) == 0
    assert main(["evidence", "verify", str(path), "--key", pub]) == 1
    capsys.readouterr()


async def test_evidence_needs_auditor_and_existing_request(running: Running) -> None:
    async with running.admin() as s:
        st, err = await call(s, "GET", "/api/v1/access-requests/req_nope/evidence")
        assert st == 404
