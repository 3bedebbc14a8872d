"""Notifier against real peers on loopback: aiosmtpd, an aiohttp SMS provider, files."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ipaddress
import logging
import socket
import ssl
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from domum_gateway.control.notifier import (
    Message,
    OutboxNotifier,
    RoutingNotifier,
    SmsNotifier,
    SmtpNotifier,
    build_notifier,
    mask_recipient,
    render_link_message,
    render_token_message,
)
from domum_gateway.errors import ConfigError, DeliveryError
from domum_gateway.model import Channel

LINK = "https://gateway.example.com:8443/a/" + "L" * 43
TOKEN = "48213907"
SENDER = "gateway@example.com"
START = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
END = datetime(2026, 5, 1, 17, 0, tzinfo=UTC)


def link_message(channel: Any = "email", to: str = "alice@example.com") -> Message:
    return render_link_message(
        channel,
        to,
        user_name="Alice Martin",
        link_url=LINK,
        justification="Quarterly database maintenance",
        start=START,
        end=END,
    )


# ------------------------------------------------------------------- SMTP peers


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool
    login: bytes | None


@dataclass
class RecordingHandler:
    """An aiosmtpd handler that keeps what it accepts; ``refuse`` makes it say 550."""

    refuse: str | None = None
    received: list[Received] = field(default_factory=list)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if self.refuse:
            return self.refuse
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.received.append(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                message=parsed,
                tls=session.ssl is not None,
                login=session.auth_data if session.authenticated else None,
            )
        )
        return "250 Message accepted"


class LoopbackController(Controller):
    """aiosmtpd's Controller on an ephemeral port.

    The stock controller pokes ``self.port`` to check the server is up, which is 0 here;
    read the port the kernel chose first.
    """

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


@pytest.fixture
def smtp_server() -> Iterator[tuple[LoopbackController, RecordingHandler]]:
    handler = RecordingHandler()
    controller = LoopbackController(handler, hostname="127.0.0.1", port=0)
    controller.start()
    yield controller, handler
    controller.stop()


@dataclass
class Pki:
    cert_pem: bytes
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.cert_pem.decode())


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A throwaway self-signed certificate for 127.0.0.1 and localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "domum test smtp")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file, key_file = tmp_path / "smtp.crt", tmp_path / "smtp.key"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pki(cert_pem, cert_file, key_file)


@pytest.fixture
def starttls_server(pki: Pki) -> Iterator[tuple[LoopbackController, RecordingHandler]]:
    """An SMTP server that requires STARTTLS and accepts AUTH for alice / s3cret only."""

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth: Any) -> AuthResult:
        ok = auth.login == b"alice" and auth.password == b"s3cret"
        return AuthResult(success=ok, auth_data=auth.login if ok else None)

    handler = RecordingHandler()
    controller = LoopbackController(
        handler,
        hostname="127.0.0.1",
        port=0,
        tls_context=pki.server_context(),
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
    )
    controller.start()
    yield controller, handler
    controller.stop()


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def smtp(port: int, **kwargs: Any) -> SmtpNotifier:
    options: dict[str, Any] = {
        "starttls": False,
        "username": "",
        "password": "",
        "sender": SENDER,
        "timeout": 5.0,
    }
    options.update(kwargs)
    return SmtpNotifier("127.0.0.1", port, **options)


# ------------------------------------------------------------------------- SMTP


async def test_smtp_delivers_link_message(
    smtp_server: tuple[LoopbackController, RecordingHandler],
) -> None:
    controller, handler = smtp_server
    await smtp(controller.port).send(link_message())

    [got] = handler.received
    assert got.mail_from == SENDER
    assert got.rcpt_tos == ["alice@example.com"]
    assert got.tls is False
    mail = got.message
    assert mail["From"] == SENDER
    assert mail["To"] == "alice@example.com"
    assert mail["Subject"] == "Your Domum Gateway access link"
    assert mail["Message-ID"].endswith("@example.com>")
    assert mail["Date"].datetime.tzinfo is not None
    assert mail.get_content_type() == "text/plain"
    assert mail.get_content_charset() == "utf-8"
    body = mail.get_content()
    assert LINK in body
    assert "2026-05-01 09:00 UTC" in body


async def test_smtp_sends_non_ascii_text(
    smtp_server: tuple[LoopbackController, RecordingHandler],
) -> None:
    controller, handler = smtp_server
    message = render_token_message("email", "zoe@example.com", user_name="Zoë Ångström", token=TOKEN)
    await smtp(controller.port).send(message)
    body = handler.received[0].message.get_content()
    assert "Hello Zoë Ångström," in body
    assert TOKEN in body


async def test_smtp_starttls_and_login(
    starttls_server: tuple[LoopbackController, RecordingHandler], pki: Pki
) -> None:
    controller, handler = starttls_server
    notifier = smtp(
        controller.port,
        starttls=True,
        username="alice",
        password="s3cret",
        tls_context=pki.client_context(),
    )
    await notifier.send(link_message(to="bob@example.com"))

    [got] = handler.received
    assert got.tls is True
    assert got.login == b"alice"
    assert got.rcpt_tos == ["bob@example.com"]
    assert LINK in got.message.get_content()


async def test_smtp_starttls_untrusted_certificate_is_refused(
    starttls_server: tuple[LoopbackController, RecordingHandler],
) -> None:
    controller, handler = starttls_server
    # The system trust store does not know the throwaway certificate.
    notifier = smtp(controller.port, starttls=True, username="alice", password="s3cret")
    with pytest.raises(DeliveryError, match="did not accept"):
        await notifier.send(link_message())
    assert handler.received == []


async def test_smtp_wrong_password_is_delivery_error(
    starttls_server: tuple[LoopbackController, RecordingHandler], pki: Pki
) -> None:
    controller, handler = starttls_server
    notifier = smtp(
        controller.port,
        starttls=True,
        username="alice",
        password="wrong",
        tls_context=pki.client_context(),
    )
    with pytest.raises(DeliveryError):
        await notifier.send(link_message())
    assert handler.received == []


async def test_smtp_server_that_refuses(
    smtp_server: tuple[LoopbackController, RecordingHandler],
) -> None:
    controller, handler = smtp_server
    handler.refuse = "550 5.1.1 mailbox unavailable"
    with pytest.raises(DeliveryError, match="the e-mail server did not accept the message"):
        await smtp(controller.port).send(link_message())
    assert handler.received == []


async def test_smtp_nothing_listening() -> None:
    with pytest.raises(DeliveryError) as caught:
        await smtp(free_port()).send(link_message())
    assert caught.value.status == 502
    assert caught.value.__cause__ is not None


async def test_smtp_server_that_never_greets() -> None:
    """A peer that accepts the connection and stays silent: the timeout ends the wait."""
    accepted: list[asyncio.StreamWriter] = []

    def stay_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(stay_silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(DeliveryError):
            await smtp(port, timeout=0.3).send(link_message())
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert accepted, "the client never connected"


async def test_smtp_header_injection_in_recipient_is_refused(
    smtp_server: tuple[LoopbackController, RecordingHandler],
) -> None:
    controller, handler = smtp_server
    bad = Message("email", "alice@example.com\r\nBcc: eve@example.com", "Hi", "body")
    with pytest.raises(DeliveryError):
        await smtp(controller.port).send(bad)
    assert handler.received == []


async def test_message_text_is_never_logged(
    smtp_server: tuple[LoopbackController, RecordingHandler], caplog: pytest.LogCaptureFixture
) -> None:
    controller, handler = smtp_server
    caplog.set_level(logging.DEBUG, logger="domum_gateway")
    await smtp(controller.port).send(link_message())
    handler.refuse = "550 5.1.1 mailbox unavailable"
    with pytest.raises(DeliveryError):
        await smtp(controller.port).send(
            render_token_message("email", "alice@example.com", user_name="Alice", token=TOKEN)
        )
    logged = caplog.text
    assert "a***@example.com" in logged
    assert "alice@example.com" not in logged
    assert LINK not in logged and "L" * 43 not in logged
    assert TOKEN not in logged


# -------------------------------------------------------------------------- SMS


@dataclass
class SmsProvider:
    url: str
    calls: list[tuple[str | None, Any]]
    state: dict[str, Any]


@pytest.fixture
async def sms_provider() -> AsyncIterator[SmsProvider]:
    """A real aiohttp HTTP provider; ``state["status"]`` / ``state["delay"]`` make it misbehave."""
    calls: list[tuple[str | None, Any]] = []
    state: dict[str, Any] = {"status": 202, "delay": 0.0}

    async def receive(request: web.Request) -> web.Response:
        calls.append((request.headers.get("Authorization"), await request.json()))
        if state["delay"]:
            await asyncio.sleep(state["delay"])
        if request.headers.get("Authorization") != "Bearer sms-token":
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"id": "m-1"}, status=state["status"])

    app = web.Application()
    app.router.add_post("/v1/messages", receive)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield SmsProvider(str(server.make_url("/v1/messages")), calls, state)
    finally:
        await server.close()


async def test_sms_posts_json_with_bearer_token(sms_provider: SmsProvider) -> None:
    notifier = SmsNotifier(sms_provider.url, "sms-token", timeout=5.0)
    try:
        message = link_message("sms", "+33612345678")
        await notifier.send(message)
    finally:
        await notifier.close()
    [(authorization, payload)] = sms_provider.calls
    assert authorization == "Bearer sms-token"
    assert payload == {"to": "+33612345678", "body": message.body}
    assert LINK in payload["body"]


async def test_sms_provider_error_is_delivery_error(sms_provider: SmsProvider) -> None:
    sms_provider.state["status"] = 500
    notifier = SmsNotifier(sms_provider.url, "sms-token", timeout=5.0)
    try:
        with pytest.raises(DeliveryError, match="did not accept"):
            await notifier.send(link_message("sms", "+33612345678"))
    finally:
        await notifier.close()


async def test_sms_wrong_token_is_delivery_error(sms_provider: SmsProvider) -> None:
    notifier = SmsNotifier(sms_provider.url, "stale-token", timeout=5.0)
    try:
        with pytest.raises(DeliveryError):
            await notifier.send(link_message("sms", "+33612345678"))
    finally:
        await notifier.close()


async def test_sms_slow_provider_times_out(sms_provider: SmsProvider) -> None:
    sms_provider.state["delay"] = 2.0
    notifier = SmsNotifier(sms_provider.url, "sms-token", timeout=0.3)
    try:
        with pytest.raises(DeliveryError, match="could not be reached"):
            await notifier.send(link_message("sms", "+33612345678"))
    finally:
        await notifier.close()


async def test_sms_nothing_listening() -> None:
    notifier = SmsNotifier(f"http://127.0.0.1:{free_port()}/send", "t", timeout=5.0)
    try:
        with pytest.raises(DeliveryError, match="could not be reached"):
            await notifier.send(link_message("sms", "+33612345678"))
    finally:
        await notifier.close()


async def test_sms_session_is_reopened_after_close(sms_provider: SmsProvider) -> None:
    notifier = SmsNotifier(sms_provider.url, "sms-token", timeout=5.0)
    await notifier.send(link_message("sms", "+33612345678"))
    await notifier.close()
    await notifier.send(link_message("sms", "+33612345678"))
    await notifier.close()
    assert len(sms_provider.calls) == 2


def test_sms_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match=r"sms\.url"):
        SmsNotifier("ftp://provider.example.com/send", "t")


# ----------------------------------------------------------------------- outbox


async def test_outbox_writes_private_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="domum_gateway")
    folder = tmp_path / "var" / "outbox"
    outbox = OutboxNotifier(folder)
    assert f"no e-mail or SMS provider configured: those messages go to {folder}" in caplog.text
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    await outbox.send(link_message("email", "alice@example.com"))
    [written] = list(folder.iterdir())
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert written.name.endswith(".txt") and "-email-" in written.name
    text = written.read_text(encoding="utf-8")
    head, _, body = text.partition("\n\n")
    assert "Channel: email" in head
    assert "To: alice@example.com" in head
    assert "Subject: Your Domum Gateway access link" in head
    assert LINK in body
    assert LINK not in caplog.text


async def test_outbox_tightens_existing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "outbox"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    OutboxNotifier(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


async def test_outbox_file_names_do_not_collide(tmp_path: Path) -> None:
    outbox = OutboxNotifier(tmp_path / "outbox")
    message = link_message("sms", "+33612345678")
    await asyncio.gather(*(outbox.send(message) for _ in range(20)))
    names = [p.name for p in (tmp_path / "outbox").iterdir()]
    assert len(names) == 20
    assert all("-sms-" in name for name in names)


def test_outbox_folder_that_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"outbox\.dir"):
        OutboxNotifier(blocker / "outbox")


# ---------------------------------------------------------------------- routing


@dataclass
class MemoryNotifier:
    """An in-memory notifier: keeps what it is given."""

    sent: list[Message] = field(default_factory=list)
    closed: int = 0

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    async def close(self) -> None:
        self.closed += 1


async def test_routing_by_channel(tmp_path: Path) -> None:
    mail, sms = MemoryNotifier(), MemoryNotifier()
    router = RoutingNotifier(mail, sms, None)
    await router.send(link_message("email"))
    await router.send(link_message("sms", "+33612345678"))
    assert [m.channel for m in mail.sent] == ["email"]
    assert [m.channel for m in sms.sent] == ["sms"]
    await router.close()
    assert (mail.closed, sms.closed) == (1, 1)


async def test_routing_missing_channel_goes_to_outbox(tmp_path: Path) -> None:
    mail = MemoryNotifier()
    router = RoutingNotifier(mail, None, OutboxNotifier(tmp_path / "outbox"))
    await router.send(link_message("sms", "+33612345678"))
    await router.send(link_message("email"))
    assert len(mail.sent) == 1
    [written] = list((tmp_path / "outbox").iterdir())
    assert "-sms-" in written.name
    await router.close()


async def test_routing_missing_channel_without_outbox_is_refused() -> None:
    router = RoutingNotifier(MemoryNotifier(), None, None)
    with pytest.raises(DeliveryError, match="no provider configured for sms"):
        await router.send(link_message("sms", "+33612345678"))


async def test_routing_passes_provider_failure_through(
    smtp_server: tuple[LoopbackController, RecordingHandler], tmp_path: Path
) -> None:
    """A provider that fails is a failure, not a reason to fall back to the outbox."""
    controller, handler = smtp_server
    handler.refuse = "550 5.1.1 mailbox unavailable"
    router = RoutingNotifier(smtp(controller.port), None, OutboxNotifier(tmp_path / "outbox"))
    with pytest.raises(DeliveryError):
        await router.send(link_message("email"))
    assert list((tmp_path / "outbox").iterdir()) == []


async def test_build_notifier_with_both_providers(
    smtp_server: tuple[LoopbackController, RecordingHandler],
    sms_provider: SmsProvider,
    tmp_path: Path,
) -> None:
    controller, handler = smtp_server
    router = build_notifier(
        smtp_host="127.0.0.1",
        smtp_port=controller.port,
        starttls=False,
        username="",
        password="",
        sender=SENDER,
        sms_url=sms_provider.url,
        sms_token="sms-token",
        outbox_dir=tmp_path / "outbox",
    )
    try:
        await router.send(link_message("email"))
        await router.send(link_message("sms", "+33612345678"))
    finally:
        await router.close()
    assert len(handler.received) == 1
    assert len(sms_provider.calls) == 1
    assert not (tmp_path / "outbox").exists()


async def test_build_notifier_without_providers_uses_outbox(tmp_path: Path) -> None:
    router = build_notifier(
        smtp_host="",
        smtp_port=587,
        starttls=True,
        username="",
        password="",
        sender="",
        sms_url="",
        sms_token="",
        outbox_dir=tmp_path / "outbox",
    )
    await router.send(link_message("email"))
    await router.send(link_message("sms", "+33612345678"))
    await router.close()
    assert len(list((tmp_path / "outbox").iterdir())) == 2


def test_build_notifier_needs_a_sender(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"email\.sender"):
        build_notifier(
            smtp_host="smtp.example.com",
            smtp_port=587,
            starttls=True,
            username="",
            password="",
            sender="",
            sms_url="",
            sms_token="",
            outbox_dir=tmp_path / "outbox",
        )


# -------------------------------------------------------------------- templates


def test_link_email_content() -> None:
    message = link_message("email")
    assert message.channel == "email"
    assert message.to == "alice@example.com"
    assert message.subject == "Your Domum Gateway access link"
    body = message.body
    assert "Hello Alice Martin," in body
    assert "Domum Gateway" in body
    assert "Quarterly database maintenance" in body
    assert "2026-05-01 09:00 UTC" in body and "2026-05-01 17:00 UTC" in body
    assert "2026-05-01T09:00:00+00:00" in body and "2026-05-01T17:00:00+00:00" in body
    assert LINK in body
    assert "Do not share" in body
    assert "{{" not in body and "{#" not in body


def test_link_window_is_shown_in_utc() -> None:
    paris = timezone(timedelta(hours=2))
    message = render_link_message(
        Channel.EMAIL,
        "alice@example.com",
        user_name="Alice",
        link_url=LINK,
        justification="",
        start=datetime(2026, 5, 1, 11, 0, tzinfo=paris),
        end=datetime(2026, 5, 1, 19, 0, tzinfo=paris),
    )
    assert message.channel == "email"
    assert "2026-05-01 09:00 UTC" in message.body
    assert "2026-05-01T17:00:00+00:00" in message.body
    assert "Reason" not in message.body


def test_naive_window_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        render_link_message(
            "email",
            "alice@example.com",
            user_name="Alice",
            link_url=LINK,
            justification="",
            start=datetime(2026, 5, 1, 9, 0),
            end=END,
        )


def test_justification_stays_on_its_line() -> None:
    message = render_link_message(
        "email",
        "alice@example.com",
        user_name="Alice\nBcc: eve",
        link_url=LINK,
        justification="first line\n\nsecond line",
        start=START,
        end=END,
    )
    assert "Hello Alice Bcc: eve," in message.body
    assert "first line second line" in message.body


def test_link_sms_is_short() -> None:
    message = link_message(Channel.SMS, "+33612345678")
    assert message.channel == "sms"
    assert LINK in message.body
    assert "2026-05-01 09:00 UTC" in message.body
    assert "Domum Gateway" in message.body
    assert "not share" in message.body
    assert "\n" not in message.body
    assert len(message.body) < 320


def test_token_messages() -> None:
    mail = render_token_message("email", "alice@example.com", user_name="Alice", token=TOKEN)
    assert mail.subject == "Your Domum Gateway one-time token"
    assert TOKEN in mail.body
    assert "5 minutes" in mail.body
    assert "Do not share" in mail.body

    sms = render_token_message("sms", "+33612345678", user_name="Alice", token=TOKEN, expires_minutes=10)
    assert TOKEN in sms.body
    assert "10 min" in sms.body
    assert len(sms.body) < 160


def test_unknown_channel_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown channel"):
        render_token_message("fax", "x", user_name="A", token=TOKEN)


def test_message_repr_hides_secrets() -> None:
    text = repr(link_message("email"))
    assert LINK not in text
    assert "alice@example.com" not in text
    assert "a***@example.com" in text


@pytest.mark.parametrize(
    ("to", "masked"),
    [
        ("alice@example.com", "a***@example.com"),
        ("a@example.com", "a***@example.com"),
        ("+33612345678", "+*******5678"),
        ("1234", "****"),
        ("not-an-address@", "***"),
    ],
)
def test_mask_recipient(to: str, masked: str) -> None:
    assert mask_recipient(to) == masked
