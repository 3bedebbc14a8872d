"""Sending personal links and one-time tokens by e-mail or SMS.

A :class:`Message` is rendered from a template (:func:`render_link_message`,
:func:`render_token_message`) and handed to a :class:`Notifier`. Providers:

* :class:`SmtpNotifier` — an SMTP relay through aiosmtplib (STARTTLS, AUTH);
* :class:`SmsNotifier` — an HTTP provider: ``POST {"to", "body"}`` with a Bearer token;
* :class:`OutboxNotifier` — files in a private folder, for set-ups with no provider;
* :class:`RoutingNotifier` — picks one of the above by channel (:func:`build_notifier`).

Message text carries links and tokens, so it is never logged: log lines name only the
channel, the masked recipient and the outcome. Provider failures become
:class:`~domum_gateway.errors.DeliveryError`; no aiosmtplib or aiohttp exception escapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import logging
import os
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

import aiohttp
import aiosmtplib
import jinja2

from domum_gateway.auth.secrets import mask_email, mask_phone
from domum_gateway.errors import ConfigError, DeliveryError

__all__ = [
    "Message",
    "Notifier",
    "OutboxNotifier",
    "RoutingNotifier",
    "SmsNotifier",
    "SmtpNotifier",
    "build_notifier",
    "mask_recipient",
    "render_link_message",
    "render_token_message",
]

log = logging.getLogger(__name__)

ChannelName = Literal["email", "sms"]

# Implicit TLS (SMTPS); every other port speaks plain SMTP first, then STARTTLS.
_SMTPS_PORT = 465


@dataclass(frozen=True, slots=True)
class Message:
    """One message to one recipient. ``body`` holds secrets: never log it."""

    channel: ChannelName
    to: str
    subject: str
    body: str

    def __repr__(self) -> str:
        # A stray repr in a log line or a traceback must not leak the link or token.
        return (
            f"Message(channel={self.channel!r}, to={mask_recipient(self.to)!r}, "
            f"subject={self.subject!r}, body=<{len(self.body)} chars>)"
        )


class Notifier(Protocol):
    """Delivers a :class:`Message`."""

    async def send(self, message: Message) -> None:
        """Deliver ``message``.

        Raises:
            DeliveryError: the provider refused the message or could not be reached.
        """
        ...


@runtime_checkable
class _Closable(Protocol):
    async def close(self) -> None: ...


def mask_recipient(to: str) -> str:
    """Show enough of an address or phone number to recognise it, not to use it.

    The same masks as the API's ``sent_to``: ``alice@example.com`` -> ``a***@example.com``,
    ``+41 79 555 4567`` -> ``+*******4567``.
    """
    return mask_email(to) if "@" in to else mask_phone(to)


def _describe(exc: BaseException) -> str:
    """A log-safe description of a provider failure: the class and an SMTP code, no text."""
    code = getattr(exc, "code", None)
    return f"{type(exc).__name__} {code}" if isinstance(code, int) else type(exc).__name__


class SmtpNotifier:
    """Sends e-mail through an SMTP server (one connection per message)."""

    def __init__(
        self,
        host: str,
        port: int,
        starttls: bool,
        username: str,
        password: str,
        sender: str,
        timeout: float = 10.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """
        Args:
            host, port: the SMTP server. Port 465 means implicit TLS (SMTPS).
            starttls: upgrade with STARTTLS before authenticating (required when true).
            username, password: SMTP AUTH credentials; no login when ``username`` is empty.
            sender: the ``From`` address and envelope sender.
            timeout: seconds allowed for connecting and for each SMTP command.
            tls_context: trust settings for the server certificate (default: system CAs).
        """
        self._host = host
        self._port = port
        self._implicit_tls = port == _SMTPS_PORT
        self._starttls = starttls and not self._implicit_tls
        self._username = username
        self._password = password
        self._sender = sender
        self._timeout = timeout
        self._tls_context = tls_context

    def _build(self, message: Message) -> EmailMessage:
        mail = EmailMessage()
        mail["From"] = self._sender
        mail["To"] = message.to
        mail["Subject"] = message.subject
        mail["Date"] = email.utils.format_datetime(datetime.now(UTC))
        domain = self._sender.rpartition("@")[2] or None
        mail["Message-ID"] = email.utils.make_msgid(domain=domain)
        mail.set_content(message.body, subtype="plain", charset="utf-8")
        return mail

    async def send(self, message: Message) -> None:
        """Send ``message`` by e-mail; raises :class:`DeliveryError` on any failure."""
        who = mask_recipient(message.to)
        try:
            mail = self._build(message)
        except ValueError as exc:  # CR/LF or other junk in an address or the subject
            log.warning("e-mail to %s not sent: %s", who, _describe(exc))
            raise DeliveryError("the e-mail address or subject cannot be used") from exc
        # An explicit client rather than aiosmtplib.send(): when the server never greets,
        # send()'s context manager is never entered and the socket is left for the GC.
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            use_tls=self._implicit_tls,
            start_tls=self._starttls,
            tls_context=self._tls_context,
            timeout=self._timeout,
        )
        try:
            await client.connect()
            if self._username:
                await client.login(self._username, self._password)
            await client.send_message(mail, sender=self._sender, recipients=[message.to])
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            log.warning("e-mail to %s failed: %s", who, _describe(exc))
            raise DeliveryError("the e-mail server did not accept the message") from exc
        finally:
            transport = client.transport
            if client.is_connected:
                # The message is accepted at this point; a failing QUIT changes nothing.
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                    await client.quit()
            client.close()
            if transport is not None:
                # close() only schedules the socket's release for the next loop turn;
                # abort drops unsent bytes and the yield lets the release run before we
                # return, so no socket outlives send() (seen as a ResourceWarning in CI).
                abort = getattr(transport, "abort", None)  # every stream transport has it
                if callable(abort):
                    abort()
                await asyncio.sleep(0)
        log.info("e-mail sent to %s", who)

    async def close(self) -> None:
        """Nothing to release: each message uses its own connection."""


class SmsNotifier:
    """Sends SMS through an HTTP provider: ``POST {"to", "body"}`` with a Bearer token."""

    def __init__(
        self,
        url: str,
        token: str,
        timeout: float = 10.0,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
    ) -> None:
        """
        Args:
            url: the provider endpoint (``http`` or ``https``).
            token: sent as ``Authorization: Bearer <token>``; no header when empty.
            timeout: seconds allowed for the whole request.
            session_factory: makes the client session on first use (it is closed by
                :meth:`close`); default: a plain :class:`aiohttp.ClientSession`.

        Raises:
            ConfigError: ``url`` is not an http(s) URL.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError("sms.url: must be an http:// or https:// URL")
        self._url = url
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session_factory = session_factory or aiohttp.ClientSession
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Made here, not in __init__, so it belongs to the running event loop.
        if self._session is None or self._session.closed:
            self._session = self._session_factory()
        return self._session

    async def send(self, message: Message) -> None:
        """Send ``message`` by SMS; raises :class:`DeliveryError` on any failure."""
        who = mask_recipient(message.to)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            async with self._client().post(
                self._url,
                json={"to": message.to, "body": message.body},
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("SMS to %s failed: %s", who, _describe(exc))
            raise DeliveryError("the SMS provider could not be reached") from exc
        if not 200 <= status < 300:
            # The provider's answer is not logged: it may echo the message back.
            log.warning("SMS to %s refused: HTTP %d", who, status)
            raise DeliveryError("the SMS provider did not accept the message")
        log.info("SMS sent to %s", who)

    async def close(self) -> None:
        """Close the HTTP client session, if one was opened."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class OutboxNotifier:
    """Writes each message to a private file instead of sending it.

    For set-ups with no e-mail or SMS provider: an operator hands the link over by other
    means. Files are ``<UTC timestamp>-<channel>-<random>.txt``, mode 0600, in a 0700 folder.
    """

    def __init__(self, dir: Path, missing: str = "e-mail or SMS") -> None:
        """
        Args:
            dir: where message files go.
            missing: which providers are not configured (for the start-up log line).

        Raises:
            ConfigError: the folder cannot be created.
        """
        self._dir = dir
        try:
            dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir leaves an existing folder's mode alone; messages hold secrets.
            dir.chmod(0o700)
        except OSError as exc:
            raise ConfigError(f"outbox.dir: cannot create {dir}: {exc.strerror}") from exc
        log.warning("no %s provider configured: those messages go to %s", missing, dir)

    @property
    def dir(self) -> Path:
        return self._dir

    def _write(self, message: Message) -> Path:
        now = datetime.now(UTC)
        name = f"{now:%Y%m%dT%H%M%S%fZ}-{message.channel}-{secrets.token_hex(4)}.txt"
        path = self._dir / name
        text = (
            f"Channel: {message.channel}\n"
            f"To: {message.to}\n"
            f"Subject: {message.subject}\n"
            f"Date: {now.isoformat(timespec='seconds')}\n"
            f"\n{message.body}\n"
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    async def send(self, message: Message) -> None:
        """Write ``message`` to the outbox; raises :class:`DeliveryError` if it cannot."""
        who = mask_recipient(message.to)
        try:
            path = await asyncio.to_thread(self._write, message)
        except OSError as exc:
            log.warning("outbox: %s message for %s not written: %s", message.channel, who, _describe(exc))
            raise DeliveryError("the message could not be written to the outbox") from exc
        log.info("outbox: %s message for %s written to %s", message.channel, who, path.name)

    async def close(self) -> None:
        """Nothing to release."""


class RoutingNotifier:
    """Sends each message through the provider for its channel.

    A channel without a provider goes to the outbox when there is one; otherwise the
    message is refused with :class:`DeliveryError`.
    """

    def __init__(
        self,
        email: Notifier | None,
        sms: Notifier | None,
        fallback: OutboxNotifier | None,
    ) -> None:
        self._routes: dict[str, Notifier | None] = {"email": email, "sms": sms}
        self._fallback = fallback

    async def send(self, message: Message) -> None:
        """Route ``message`` by channel; raises :class:`DeliveryError` on failure."""
        provider = self._routes.get(message.channel) or self._fallback
        if provider is None:
            log.warning(
                "%s to %s not sent: no provider configured",
                message.channel,
                mask_recipient(message.to),
            )
            raise DeliveryError(f"no provider configured for {message.channel}")
        await provider.send(message)

    async def close(self) -> None:
        """Close every provider (each at most once)."""
        seen: list[object] = []
        for child in (*self._routes.values(), self._fallback):
            if child is None or any(child is s for s in seen):
                continue
            seen.append(child)
            if isinstance(child, _Closable):
                await child.close()


def build_notifier(
    *,
    smtp_host: str,
    smtp_port: int,
    starttls: bool,
    username: str,
    password: str,
    sender: str,
    sms_url: str,
    sms_token: str,
    outbox_dir: Path,
    timeout: float = 10.0,
) -> RoutingNotifier:
    """The notifier for a configuration: e-mail when ``smtp_host`` is set, SMS when
    ``sms_url`` is set, and the outbox for whichever of the two is missing.

    Raises:
        ConfigError: ``sender`` is empty while ``smtp_host`` is set, the SMS URL is not
            http(s), or the outbox folder cannot be created.
    """
    email_provider: SmtpNotifier | None = None
    if smtp_host:
        if not sender:
            raise ConfigError("email.sender: required when email.smtp_host is set")
        email_provider = SmtpNotifier(
            smtp_host, smtp_port, starttls, username, password, sender, timeout=timeout
        )
    sms_provider = SmsNotifier(sms_url, sms_token, timeout=timeout) if sms_url else None
    fallback = None
    if email_provider is None or sms_provider is None:
        missing = " or ".join(
            name for name, p in (("e-mail", email_provider), ("SMS", sms_provider)) if p is None
        )
        fallback = OutboxNotifier(outbox_dir, missing)
    return RoutingNotifier(email_provider, sms_provider, fallback)


# ---------------------------------------------------------------------------- templates


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("domum_gateway", "control/messages"),
        autoescape=False,  # noqa: S701 - plain-text e-mail and SMS, never HTML
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )


def _channel_name(channel: str) -> ChannelName:
    if channel == "email":
        return "email"
    if channel == "sms":
        return "sms"
    raise ValueError(f"unknown channel: {channel!r}")


def _render(kind: str, channel: str, to: str, context: dict[str, object]) -> Message:
    """Render ``<kind>_<channel>.j2``: first line the subject, a blank line, the body."""
    name = _channel_name(channel)
    text = _environment().get_template(f"{kind}_{name}.j2").render(context)
    subject, _, body = text.partition("\n")
    # "-- " (with its space) is the signature separator mail clients recognise.
    body = "\n".join(line if line == "-- " else line.rstrip() for line in body.strip("\n").splitlines())
    return Message(channel=name, to=to, subject=subject.strip(), body=body)


def _utc(when: datetime, field: str) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{field} must be timezone-aware")
    return when.astimezone(UTC)


def _single_line(text: str) -> str:
    # Admin-entered text goes into a line of its own; keep it there.
    return " ".join(text.split())


def render_link_message(
    channel: str,
    to: str,
    *,
    user_name: str,
    link_url: str,
    justification: str,
    start: datetime,
    end: datetime,
) -> Message:
    """The message that carries a personal link and its access window.

    ``channel`` is ``"email"`` or ``"sms"`` (a :class:`~domum_gateway.model.Channel` works).
    The window is shown in UTC (``2026-05-01 09:00 UTC``) and in ISO 8601.

    Raises:
        ValueError: ``start`` or ``end`` is naive, or the channel is unknown.
    """
    start_utc, end_utc = _utc(start, "start"), _utc(end, "end")
    return _render(
        "link",
        channel,
        to,
        {
            "user_name": _single_line(user_name),
            "link_url": link_url,
            "justification": _single_line(justification),
            "start_text": f"{start_utc:%Y-%m-%d %H:%M} UTC",
            "end_text": f"{end_utc:%Y-%m-%d %H:%M} UTC",
            "start_iso": start_utc.isoformat(),
            "end_iso": end_utc.isoformat(),
        },
    )


def render_token_message(
    channel: str,
    to: str,
    *,
    user_name: str,
    token: str,
    expires_minutes: int = 5,
) -> Message:
    """The message that carries a one-time login token.

    ``channel`` is ``"email"`` or ``"sms"`` (a :class:`~domum_gateway.model.Channel` works).

    Raises:
        ValueError: the channel is unknown.
    """
    return _render(
        "token",
        channel,
        to,
        {
            "user_name": _single_line(user_name),
            "token": token,
            "expires_minutes": expires_minutes,
        },
    )
