"""Typed, frozen settings, read once from one TOML file.

The file is ``config/domum.toml`` unless ``--config PATH`` or ``DOMUM_CONFIG`` says
otherwise. Relative paths inside it (including the path in ``sqlite:///relative.db``)
are relative to the file's folder and are resolved to absolute paths here, so nothing
downstream depends on the working directory.

Every problem stops start-up with a :class:`~domum_gateway.errors.ConfigError` whose
message names the file and the dotted key (``config/domum.toml: unknown key
'public.lisen'``). All problems found in one pass are reported together, one per line.
Nothing here registers anything at import time.
"""

from __future__ import annotations

import difflib
import hmac
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from email.utils import parseaddr
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from domum_gateway.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "AdminSettings",
    "EmailSettings",
    "GeoipSettings",
    "HostPort",
    "OutboxSettings",
    "ProxySettings",
    "PublicSettings",
    "RetentionSettings",
    "Secret",
    "Settings",
    "SmsSettings",
    "SshSettings",
    "StorageSettings",
    "TlsSettings",
    "default_settings",
    "load_settings",
    "resolve_config_path",
    "settings_from_mapping",
]

DEFAULT_CONFIG_PATH = "config/domum.toml"
CONFIG_ENV = "DOMUM_CONFIG"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 1123 labels; underscores are tolerated because internal DNS often has them.
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


class Secret:
    """A string that does not show itself in ``repr``, ``str``, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The wrapped value; call it only where the secret is actually used."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))


_NO_SECRET = Secret("")


def _is_hostname(value: str) -> bool:
    name = value[:-1] if value.endswith(".") else value
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


@dataclass(frozen=True, slots=True)
class HostPort:
    """A listen or connect address: a host name or IP literal and a port (0 = ephemeral)."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not between 0 and 65535")
        if not self.host:
            raise ValueError("host is empty")

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Parse ``host:port``; an IPv6 host is written in brackets: ``[::1]:8443``.

        Raises:
            ValueError: with a sentence saying what is wrong.
        """
        text = text.strip()
        if text.startswith("["):
            end = text.find("]")
            if end < 0 or text[end + 1 : end + 2] != ":":
                raise ValueError(f"{text!r} is not [IPv6]:port")
            host, port_text = text[1:end], text[end + 2 :]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"{text!r} is not host:port")
            if ":" in host:
                raise ValueError(f"{text!r}: write an IPv6 host in brackets, like [::1]:8443")
            if not _is_hostname(host):
                raise ValueError(f"{host!r} is not a host name or IPv4 address")
        if not port_text.isdigit() or not port_text.isascii():
            raise ValueError(f"port {port_text!r} is not a number")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PublicSettings:
    """The public HTTPS listener remote users reach."""

    listen: HostPort = HostPort("0.0.0.0", 8443)
    # Scheme, host and port only, without a trailing slash: links are base_url + "/a/...".
    base_url: str = "https://localhost:8443"
    # When set, target {name} is also served at https://{name}.{domain}.
    domain: str = ""
    # Peers whose X-Forwarded-For is believed; everyone else is the origin themselves.
    trusted_proxies: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class SshSettings:
    """The SSH jump listener for native OpenSSH clients, and the browser terminal's SSH client."""

    listen: HostPort
    host_key: Path
    # Seconds a target has, once TCP connects, to exchange versions and keys and ask for
    # credentials; the person's typing afterwards has its own, longer limit.
    handshake_timeout: float = 15.0


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The admin HTTPS listener: control API, console, metrics, health."""

    listen: HostPort = HostPort("127.0.0.1", 9443)


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Certificate and key served by both HTTPS listeners, and the CA clients trust."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, slots=True, repr=False)
class StorageSettings:
    """Where state lives; a relative SQLite path is already resolved in ``url``.

    ``pool_size`` and ``statement_timeout`` (seconds) apply to PostgreSQL only.
    """

    url: str
    pool_size: int = 10
    statement_timeout: float = 5.0

    @property
    def kind(self) -> Literal["sqlite", "postgresql"]:
        return "sqlite" if self.url.startswith("sqlite:") else "postgresql"

    @property
    def sqlite_path(self) -> Path | None:
        """The database file for SQLite, absolute; None for PostgreSQL."""
        if self.kind != "sqlite":
            return None
        return Path(self.url[len("sqlite:///") :])

    def __repr__(self) -> str:
        # A PostgreSQL URL may carry a password.
        parts = urlsplit(self.url)
        if parts.password is None:
            return f"StorageSettings(url={self.url!r})"
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        masked = urlunsplit(parts._replace(netloc=f"{user}:****@{host}"))
        return f"StorageSettings(url={masked!r})"


@dataclass(frozen=True, slots=True)
class EmailSettings:
    """SMTP delivery of links and tokens; off while ``smtp_host`` is empty."""

    smtp_host: str = ""
    smtp_port: int = 587
    starttls: bool = True
    username: str = ""
    password: Secret = _NO_SECRET
    sender: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.smtp_host)


@dataclass(frozen=True, slots=True)
class SmsSettings:
    """HTTP SMS provider (``POST {"to", "body"}`` with a Bearer token); off while no url."""

    url: str = ""
    token: Secret = _NO_SECRET

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    """Folder where messages are written when no e-mail or SMS channel is configured."""

    dir: Path


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """Days after a grant ends before its personal data is purged."""

    days: int = 90


@dataclass(frozen=True, slots=True)
class GeoipSettings:
    """MaxMind database for country origin rules; None turns country rules off."""

    database: Path | None = None


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Timeouts towards targets, in seconds."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway reads from its configuration file."""

    path: Path
    public: PublicSettings
    ssh: SshSettings
    admin: AdminSettings
    tls: TlsSettings
    storage: StorageSettings
    email: EmailSettings
    sms: SmsSettings
    outbox: OutboxSettings
    retention: RetentionSettings
    geoip: GeoipSettings
    proxy: ProxySettings

    @property
    def config_dir(self) -> Path:
        """The folder relative paths in the file are relative to."""
        return self.path.parent


def resolve_config_path(cli_value: str | None) -> Path:
    """The configuration file to use: ``--config``, else ``$DOMUM_CONFIG``, else the default."""
    value = cli_value or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH
    return Path(value).expanduser()


def load_settings(path: Path) -> Settings:
    """Read, validate and resolve the TOML file at ``path``.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid TOML, or has an
            unknown key or a bad value; the message names the file and the key.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such configuration file; run `domum-gateway init --config {path}` to create one"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        # The message carries "(at line N, column M)".
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return settings_from_mapping(data, path)


def default_settings(path: Path) -> Settings:
    """The settings an empty file at ``path`` would give."""
    return settings_from_mapping({}, path)


def settings_from_mapping(data: Mapping[str, Any], path: Path) -> Settings:
    """Validate already-parsed TOML data as if it had been read from ``path``.

    Raises:
        ConfigError: listing every unknown key and bad value found.
    """
    base = path.expanduser().resolve().parent
    problems = _Problems(str(path))
    sections: dict[str, _Section] = {}

    def section(name: str) -> _Section:
        value = data.get(name, {})
        if not isinstance(value, Mapping):
            problems.add(f"'{name}' must be a table [{name}], got {_describe(value)}")
            value = {}
        sections[name] = _Section(name, value, base, problems)
        return sections[name]

    public = _public(section("public"))
    ssh = _ssh(section("ssh"))
    admin = AdminSettings(listen=section("admin").hostport("listen", "127.0.0.1:9443"))
    tls = _tls(section("tls"))
    storage = _storage(section("storage"))
    email = _email(section("email"))
    sms = _sms(section("sms"))
    outbox = OutboxSettings(dir=section("outbox").path("dir", "../var/outbox"))
    retention = RetentionSettings(
        days=section("retention").integer("days", 90, 1, 36500, "a whole number of days >= 1")
    )
    geoip = GeoipSettings(database=section("geoip").optional_path("database"))
    proxy = _proxy(section("proxy"))

    for name, value in data.items():
        if name not in sections:
            problems.unknown(name, sections, section=isinstance(value, Mapping))
    for sec in sections.values():
        sec.check_unknown()
    problems.raise_if_any()

    return Settings(
        path=path.expanduser().resolve(),
        public=public,
        ssh=ssh,
        admin=admin,
        tls=tls,
        storage=storage,
        email=email,
        sms=sms,
        outbox=outbox,
        retention=retention,
        geoip=geoip,
        proxy=proxy,
    )


def _public(sec: _Section) -> PublicSettings:
    return PublicSettings(
        listen=sec.hostport("listen", "0.0.0.0:8443"),
        base_url=sec.base_url("base_url", "https://localhost:8443"),
        domain=sec.domain("domain"),
        trusted_proxies=sec.networks("trusted_proxies"),
    )


def _ssh(sec: _Section) -> SshSettings:
    return SshSettings(
        listen=sec.hostport("listen", "0.0.0.0:2222"),
        host_key=sec.path("host_key", "../certs/ssh_host_ed25519_key"),
        handshake_timeout=sec.seconds("handshake_timeout", 15.0),
    )


def _tls(sec: _Section) -> TlsSettings:
    return TlsSettings(
        cert=sec.path("cert", "../certs/gateway.crt"),
        key=sec.path("key", "../certs/gateway.key"),
        ca=sec.path("ca", "../certs/ca.crt"),
    )


def _storage(sec: _Section) -> StorageSettings:
    return StorageSettings(
        url=sec.storage_url("url", "sqlite:///../var/domum.db"),
        pool_size=sec.integer("pool_size", 10, 1, 1000, "a whole number of connections from 1 to 1000"),
        statement_timeout=sec.seconds("statement_timeout", 5.0),
    )


def _email(sec: _Section) -> EmailSettings:
    host = sec.text("smtp_host", "").strip()
    if host and not (_is_hostname(host) or _is_ip(host)):
        sec.bad("smtp_host", "a host name or IP address", host)
    port = sec.integer("smtp_port", 587, 1, 65535, "a port number from 1 to 65535")
    starttls = sec.boolean("starttls", True)
    username = sec.text("username", "")
    password = sec.secret("password")
    sender = sec.text("sender", "").strip()
    if sender and "@" not in parseaddr(sender)[1]:
        sec.bad("sender", 'an address like "Domum Gateway <gateway@example.com>"', sender)
    elif host and not sender:
        sec.problems.add(
            "'email.sender' must be set when 'email.smtp_host' is set "
            '(the From address, like "gateway@example.com")'
        )
    return EmailSettings(host, port, starttls, username, password, sender)


def _sms(sec: _Section) -> SmsSettings:
    url = sec.text("url", "").strip()
    if url and not _is_http_url(url):
        sec.bad("url", "an http:// or https:// URL of the SMS provider", url)
    return SmsSettings(url=url, token=sec.secret("token"))


def _proxy(sec: _Section) -> ProxySettings:
    return ProxySettings(
        connect_timeout=sec.seconds("connect_timeout", 10.0),
        read_timeout=sec.seconds("read_timeout", 60.0),
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_http_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
        _ = parts.port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _describe(value: object) -> str:
    kinds: tuple[tuple[type | tuple[type, ...], str], ...] = (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        ((datetime, date, time), "a date/time"),
        (list, "an array"),
        (Mapping, "a table"),
    )
    for kind, name in kinds:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Problems:
    """Collects every problem so that one run reports them all."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(f"{self.file}: {message}")

    def unknown(self, dotted: str, known: Iterable[str], *, section: bool = False) -> None:
        close = difflib.get_close_matches(dotted, list(known), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        self.add(f"unknown {'section' if section else 'key'} '{dotted}'{hint}")

    def raise_if_any(self) -> None:
        if self.messages:
            raise ConfigError("\n".join(self.messages))


class _Section:
    """Typed reads of one table; remembers which keys were asked for."""

    def __init__(self, name: str, table: Mapping[str, Any], base: Path, problems: _Problems) -> None:
        self.name = name
        self.table = table
        self.base = base
        self.problems = problems
        self.known: list[str] = []

    def _get(self, key: str) -> object:
        self.known.append(key)
        return self.table.get(key)

    def bad(self, key: str, expected: str, value: object, *, hidden: bool = False) -> None:
        got = _describe(value) if hidden else _show(value)
        self.problems.add(f"invalid value for '{self.name}.{key}': expected {expected}, got {got}")

    def check_unknown(self) -> None:
        known = [f"{self.name}.{k}" for k in self.known]
        for key in self.table:
            if key not in self.known:
                self.problems.unknown(f"{self.name}.{key}", known)

    def text(self, key: str, default: str, expected: str = "a string") -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.bad(key, expected, value)
            return default
        return value

    def secret(self, key: str) -> Secret:
        value = self._get(key)
        if value is None:
            return Secret("")
        if not isinstance(value, str):
            self.bad(key, "a string", value, hidden=True)
            return Secret("")
        return Secret(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.bad(key, "true or false", value)
            return default
        return value

    def integer(self, key: str, default: int, low: int, high: int, expected: str) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.bad(key, expected, value)
            return default
        return value

    def seconds(self, key: str, default: float) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            self.bad(key, "a positive number of seconds", value)
            return default
        return float(value)

    def _resolve(self, text: str) -> Path:
        return (self.base / Path(text).expanduser()).resolve()

    def path(self, key: str, default: str) -> Path:
        text = self.text(key, default, "a path string")
        if not text.strip():
            self.bad(key, "a file or folder path", text)
            text = default
        return self._resolve(text)

    def optional_path(self, key: str) -> Path | None:
        text = self.text(key, "", 'a path string, or "" for none')
        return self._resolve(text) if text.strip() else None

    def hostport(self, key: str, default: str) -> HostPort:
        text = self.text(key, default, f'a "host:port" string like "{default}"')
        try:
            return HostPort.parse(text)
        except ValueError as exc:
            self.bad(key, f'host:port like "{default}" ({exc})', text)
            return HostPort.parse(default)

    def base_url(self, key: str, default: str) -> str:
        text = self.text(key, default).strip()
        expected = 'an http(s) URL with no path, like "https://gateway.example.com:8443"'
        if not _is_http_url(text):
            self.bad(key, expected, text)
            return default
        parts = urlsplit(text)
        if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
            self.bad(key, expected, text)
            return default
        return f"{parts.scheme}://{parts.netloc.lower()}"

    def domain(self, key: str) -> str:
        text = self.text(key, "").strip().lower().rstrip(".")
        if text and not _is_hostname(text):
            self.bad(key, 'a DNS domain like "gateway.example.com", or ""', text)
            return ""
        return text

    def networks(self, key: str) -> tuple[IPNetwork, ...]:
        value = self._get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            self.bad(key, 'an array of CIDRs like ["10.0.0.0/8"]', value)
            return ()
        found: list[IPNetwork] = []
        for index, item in enumerate(value):
            where = f"{key}[{index}]"
            if not isinstance(item, str):
                self.bad(where, 'a CIDR string like "10.0.0.0/8"', item)
                continue
            try:
                found.append(ipaddress.ip_network(item.strip(), strict=True))
            except ValueError as exc:
                self.bad(where, f'a CIDR like "10.0.0.0/8" or "fd00::/8" ({exc})', item)
        return tuple(found)

    def storage_url(self, key: str, default: str) -> str:
        text = self.text(key, default).strip()
        expected = '"sqlite:///PATH" or "postgresql://USER@HOST/DB"'
        if text.startswith("sqlite:"):
            if not text.startswith("sqlite:///") or len(text) == len("sqlite:///"):
                self.bad(key, f"{expected} (SQLite takes three slashes and a path)", text)
                text = default
            return self._sqlite(text)
        try:
            parts = urlsplit(text)
            _ = parts.port
        except ValueError as exc:
            self.bad(key, f"{expected} ({exc})", text, hidden=True)
            return self._sqlite(default)
        if parts.scheme not in ("postgresql", "postgres") or not (parts.netloc or parts.path):
            self.bad(key, expected, text, hidden=parts.password is not None)
            return self._sqlite(default)
        return text

    def _sqlite(self, url: str) -> str:
        # "sqlite:////abs" keeps its leading slash after the prefix and so stays absolute.
        return "sqlite:///" + str(self._resolve(url[len("sqlite:///") :]))
