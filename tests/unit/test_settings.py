"""Settings: defaults, path resolution, and one clear message per bad key."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from domum_gateway.config_template import render_config
from domum_gateway.errors import ConfigError
from domum_gateway.settings import (
    EmailSettings,
    GeoipSettings,
    HostPort,
    ProxySettings,
    RetentionSettings,
    Secret,
    SmsSettings,
    StorageSettings,
    default_settings,
    load_settings,
    resolve_config_path,
    settings_from_mapping,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config" / "domum.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_for(data: dict[str, Any], path: Path = Path("config/domum.toml")) -> str:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data, path)
    return str(info.value)


# --- Secret -----------------------------------------------------------------------------


def test_secret_masks_itself() -> None:
    secret = Secret("hunter2")
    assert repr(secret) == "Secret('**********')"
    assert str(secret) == "Secret('**********')"
    assert f"{secret}" == "Secret('**********')"
    assert "hunter2" not in repr(EmailSettings(password=secret))
    assert secret.reveal() == "hunter2"
    assert secret
    assert not Secret("")
    assert secret == Secret("hunter2")
    assert secret != Secret("other")


# --- HostPort ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("0.0.0.0:8443", "0.0.0.0", 8443),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("[::1]:8443", "::1", 8443),
        ("[::]:65535", "::", 65535),
        ("gateway.example.com:2222", "gateway.example.com", 2222),
        ("localhost:1", "localhost", 1),
    ],
)
def test_hostport_parse(text: str, host: str, port: int) -> None:
    parsed = HostPort.parse(text)
    assert parsed == HostPort(host, port)
    assert HostPort.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "8443",
        ":8443",
        "0.0.0.0:",
        "0.0.0.0:65536",
        "0.0.0.0:-1",
        "0.0.0.0:http",
        "::1:8443",
        "[::1]8443",
        "[nothost]:80",
        "[::1:80",
        "bad host:80",
        "0.0.0.0:\uff18\uff14",
    ],
)
def test_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        HostPort.parse(text)


def test_hostport_str_brackets_ipv6() -> None:
    assert str(HostPort("::1", 8443)) == "[::1]:8443"
    assert str(HostPort("0.0.0.0", 8443)) == "0.0.0.0:8443"


# --- defaults and paths -----------------------------------------------------------------


def test_defaults_match_design(tmp_path: Path) -> None:
    path = tmp_path / "config" / "domum.toml"
    s = default_settings(path)
    root = tmp_path.resolve()
    assert s.path == path.resolve()
    assert s.config_dir == root / "config"
    assert s.public.listen == HostPort("0.0.0.0", 8443)
    assert s.public.base_url == "https://localhost:8443"
    assert s.public.domain == ""
    assert s.public.trusted_proxies == ()
    assert s.ssh.listen == HostPort("0.0.0.0", 2222)
    assert s.ssh.host_key == root / "certs" / "ssh_host_ed25519_key"
    assert s.admin.listen == HostPort("127.0.0.1", 9443)
    assert s.tls.cert == root / "certs" / "gateway.crt"
    assert s.tls.key == root / "certs" / "gateway.key"
    assert s.tls.ca == root / "certs" / "ca.crt"
    assert s.storage.kind == "sqlite"
    assert s.storage.sqlite_path == root / "var" / "domum.db"
    assert s.email == EmailSettings()
    assert s.email.smtp_port == 587
    assert s.email.starttls is True
    assert not s.email.enabled
    assert s.sms == SmsSettings()
    assert not s.sms.enabled
    assert s.outbox.dir == root / "var" / "outbox"
    assert s.retention == RetentionSettings(days=90)
    assert s.geoip == GeoipSettings(database=None)
    assert s.proxy == ProxySettings(connect_timeout=10.0, read_timeout=60.0)


def test_empty_file_equals_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_settings(path) == default_settings(path)


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = default_settings(tmp_path / "domum.toml")
    with pytest.raises(AttributeError):
        s.public.base_url = "https://evil"  # type: ignore[misc]


def test_relative_paths_follow_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        """
[tls]
cert = "tls/my.crt"
key = "/etc/domum/my.key"
[storage]
url = "sqlite:///data/g.db"
[geoip]
database = "../geo/country.mmdb"
""",
    )
    monkeypatch.chdir("/")
    s = load_settings(path)
    config_dir = path.parent.resolve()
    assert s.tls.cert == config_dir / "tls" / "my.crt"
    assert s.tls.key == Path("/etc/domum/my.key")
    assert s.storage.sqlite_path == config_dir / "data" / "g.db"
    assert s.storage.url == f"sqlite:///{config_dir}/data/g.db"
    assert s.geoip.database == tmp_path.resolve() / "geo" / "country.mmdb"


def test_relative_config_path_is_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "")
    monkeypatch.chdir(tmp_path)
    s = load_settings(Path("config/domum.toml"))
    assert s.path == tmp_path.resolve() / "config" / "domum.toml"
    assert s.tls.ca == tmp_path.resolve() / "certs" / "ca.crt"


def test_sqlite_absolute_path(tmp_path: Path) -> None:
    s = settings_from_mapping({"storage": {"url": "sqlite:////srv/domum/state.db"}}, tmp_path / "domum.toml")
    assert s.storage.sqlite_path == Path("/srv/domum/state.db")
    assert s.storage.url == "sqlite:////srv/domum/state.db"


def test_postgresql_url_kept_and_password_masked(tmp_path: Path) -> None:
    url = "postgresql://domum:s3cret@db.internal:5432/domum"
    s = settings_from_mapping({"storage": {"url": url}}, tmp_path / "domum.toml")
    assert s.storage.kind == "postgresql"
    assert s.storage.sqlite_path is None
    assert s.storage.url == url
    assert "s3cret" not in repr(s)
    assert "domum:****@db.internal:5432" in repr(s.storage)
    assert repr(StorageSettings("sqlite:////x.db")) == "StorageSettings(url='sqlite:////x.db')"


def test_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[public]
listen = "[::]:443"
base_url = "https://Gateway.Example.com/"
domain = "Apps.Example.com."
trusted_proxies = ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]

[ssh]
listen = "127.0.0.1:0"

[email]
smtp_host = "smtp.example.com"
smtp_port = 465
starttls = false
username = "gw"
password = "pw"
sender = "Domum <gw@example.com>"

[sms]
url = "https://sms.example.com/send"
token = "tok"

[retention]
days = 1

[proxy]
connect_timeout = 2
read_timeout = 0.5
""",
    )
    s = load_settings(path)
    assert s.public.listen == HostPort("::", 443)
    assert s.public.base_url == "https://gateway.example.com"
    assert s.public.domain == "apps.example.com"
    assert s.public.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.0.2.7/32"),
    )
    assert s.ssh.listen.port == 0
    assert s.email.enabled
    assert s.email.smtp_port == 465
    assert s.email.starttls is False
    assert s.email.password.reveal() == "pw"
    assert s.sms.enabled
    assert s.sms.token.reveal() == "tok"
    assert s.retention.days == 1
    assert s.proxy == ProxySettings(connect_timeout=2.0, read_timeout=0.5)
    assert isinstance(s.proxy.connect_timeout, float)


# --- errors -----------------------------------------------------------------------------


def test_unknown_key_names_file_and_dotted_key() -> None:
    message = error_for({"public": {"lisen": "0.0.0.0:1"}})
    assert message == ("config/domum.toml: unknown key 'public.lisen' (did you mean 'public.listen'?)")
    assert message.startswith("config/domum.toml: unknown key 'public.lisen'")


def test_unknown_section() -> None:
    message = error_for({"publik": {"listen": "0.0.0.0:1"}})
    assert message.startswith("config/domum.toml: unknown section 'publik'")
    assert "did you mean 'public'" in message
    assert "unknown key 'debug'" in error_for({"debug": True})


def test_section_must_be_a_table() -> None:
    assert "'public' must be a table [public]" in error_for({"public": "x"})


def test_all_problems_reported_together() -> None:
    message = error_for({"public": {"listen": "nope", "extra": 1}, "retention": {"days": 0}})
    lines = message.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("config/domum.toml: ") for line in lines)
    assert any("'public.listen'" in line for line in lines)
    assert any("'public.extra'" in line for line in lines)
    assert any("'retention.days'" in line for line in lines)


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"public": {"listen": 8443}}, "public.listen", "host:port"),
        ({"public": {"listen": "0.0.0.0:99999"}}, "public.listen", "host:port"),
        ({"public": {"listen": "0.0.0.0"}}, "public.listen", "host:port"),
        ({"admin": {"listen": "::1:9443"}}, "admin.listen", "host:port"),
        ({"ssh": {"listen": "[::1]:x"}}, "ssh.listen", "host:port"),
        ({"public": {"base_url": "gateway.example.com"}}, "public.base_url", "http(s) URL"),
        ({"public": {"base_url": "ftp://gateway"}}, "public.base_url", "http(s) URL"),
        ({"public": {"base_url": "https://"}}, "public.base_url", "http(s) URL"),
        ({"public": {"base_url": "https://gw:99999"}}, "public.base_url", "http(s) URL"),
        ({"public": {"base_url": "https://gw/prefix"}}, "public.base_url", "no path"),
        ({"public": {"base_url": "https://u:p@gw"}}, "public.base_url", "http(s) URL"),
        ({"public": {"domain": "bad domain"}}, "public.domain", "DNS domain"),
        ({"public": {"trusted_proxies": "10.0.0.0/8"}}, "public.trusted_proxies", "array"),
        ({"public": {"trusted_proxies": ["010.0.0.0/8"]}}, "public.trusted_proxies[0]", "CIDR"),
        ({"public": {"trusted_proxies": ["10.0.0.1/8"]}}, "public.trusted_proxies[0]", "CIDR"),
        ({"public": {"trusted_proxies": ["ok", 5]}}, "public.trusted_proxies[1]", "CIDR"),
        ({"public": {"trusted_proxies": ["::/129"]}}, "public.trusted_proxies[0]", "CIDR"),
        ({"ssh": {"host_key": ""}}, "ssh.host_key", "path"),
        ({"ssh": {"host_key": 3}}, "ssh.host_key", "a path string"),
        ({"tls": {"cert": ["a"]}}, "tls.cert", "a path string"),
        ({"storage": {"url": "mysql://db/x"}}, "storage.url", "postgresql://"),
        ({"storage": {"url": "sqlite://rel.db"}}, "storage.url", "three slashes"),
        ({"storage": {"url": "sqlite:///"}}, "storage.url", "three slashes"),
        ({"storage": {"url": "postgresql://h:bad/db"}}, "storage.url", "postgresql://"),
        ({"email": {"smtp_port": 0}}, "email.smtp_port", "port number"),
        ({"email": {"smtp_port": "25"}}, "email.smtp_port", "port number"),
        ({"email": {"starttls": "yes"}}, "email.starttls", "true or false"),
        ({"email": {"starttls": 1}}, "email.starttls", "true or false"),
        ({"email": {"sender": "nobody"}}, "email.sender", "address"),
        ({"email": {"smtp_host": "smtp.example.com"}}, "email.sender", "must be set"),
        ({"email": {"smtp_host": "bad host"}}, "email.smtp_host", "host name"),
        ({"sms": {"url": "sms.example.com"}}, "sms.url", "http://"),
        ({"retention": {"days": 0}}, "retention.days", "days >= 1"),
        ({"retention": {"days": True}}, "retention.days", "days >= 1"),
        ({"retention": {"days": 1.5}}, "retention.days", "days >= 1"),
        ({"proxy": {"connect_timeout": -1}}, "proxy.connect_timeout", "positive"),
        ({"proxy": {"read_timeout": 0}}, "proxy.read_timeout", "positive"),
        ({"proxy": {"read_timeout": float("inf")}}, "proxy.read_timeout", "positive"),
        ({"proxy": {"read_timeout": "60"}}, "proxy.read_timeout", "positive"),
        ({"geoip": {"database": False}}, "geoip.database", "a path string"),
    ],
)
def test_bad_values_name_file_key_and_expectation(data: dict[str, Any], key: str, expected: str) -> None:
    message = error_for(data)
    assert message.startswith("config/domum.toml: ")
    assert f"'{key}'" in message
    assert expected in message


def test_secrets_and_passwords_are_not_echoed() -> None:
    assert "hunter2" not in error_for({"email": {"password": ["hunter2"]}})
    message = error_for({"storage": {"url": "mysql://u:hunter2@db/x"}})
    assert "hunter2" not in message
    assert "'storage.url'" in message


def test_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "domum.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert f"domum-gateway init --config {path}" in str(info.value)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[public]\nlisten = "0.0.0.0:8443"\nbase_url = \n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "domum.toml"
    path.write_bytes(b'[public]\ndomain = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_settings(path)


def test_unreadable_path_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path)


# --- config path ------------------------------------------------------------------------


def test_resolve_config_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOMUM_CONFIG", raising=False)
    assert resolve_config_path(None) == Path("config/domum.toml")
    monkeypatch.setenv("DOMUM_CONFIG", "/etc/domum/env.toml")
    assert resolve_config_path(None) == Path("/etc/domum/env.toml")
    assert resolve_config_path("cli.toml") == Path("cli.toml")
    monkeypatch.setenv("DOMUM_CONFIG", "")
    assert resolve_config_path(None) == Path("config/domum.toml")


# --- the template init writes -----------------------------------------------------------


def test_template_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path, render_config("gateway.example.com"))
    s = load_settings(path)
    defaults = default_settings(path)
    assert s.public.base_url == "https://gateway.example.com:8443"
    assert s.public == type(s.public)(defaults.public.listen, "https://gateway.example.com:8443", "", ())
    # Apart from base_url, every value written equals the default.
    for name in (
        "ssh",
        "admin",
        "tls",
        "storage",
        "email",
        "sms",
        "outbox",
        "retention",
        "geoip",
        "proxy",
    ):
        assert getattr(s, name) == getattr(defaults, name), name


def test_template_lists_every_key_on_its_own_line() -> None:
    text = render_config("gw")
    for key in (
        "listen",
        "base_url",
        "domain",
        "trusted_proxies",
        "host_key",
        "cert",
        "key",
        "ca",
        "url",
        "smtp_host",
        "smtp_port",
        "starttls",
        "username",
        "password",
        "sender",
        "token",
        "dir",
        "days",
        "database",
        "connect_timeout",
        "read_timeout",
    ):
        assert f"\n{key} = " in text, key
    for section in (
        "public",
        "ssh",
        "admin",
        "tls",
        "storage",
        "email",
        "sms",
        "outbox",
        "retention",
        "geoip",
        "proxy",
    ):
        assert f"\n[{section}]\n" in text, section


def test_template_ports_and_ip_hosts(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, render_config("::1", 443, 22, 9000)))
    assert s.public.base_url == "https://[::1]:443"
    assert s.public.listen.port == 443
    assert s.ssh.listen.port == 22
    assert s.admin.listen == HostPort("127.0.0.1", 9000)
    assert "https://192.0.2.1:8443" in render_config("192.0.2.1")


@pytest.mark.parametrize("hostname", ["", "bad host", 'x"\n[evil]', "a..b", "-x.example"])
def test_template_rejects_bad_hostnames(hostname: str) -> None:
    with pytest.raises(ConfigError):
        render_config(hostname)


def test_template_rejects_bad_ports() -> None:
    with pytest.raises(ConfigError):
        render_config("gw", public_port=0)
