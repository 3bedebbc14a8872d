"""The commented ``domum.toml`` that ``domum-gateway init`` writes.

It lists every key with its default, one per line, so that an operator edits values
rather than looking names up. ``tests/unit/test_settings.py`` loads the rendered text
with :func:`domum_gateway.settings.load_settings` to keep the two in step.
"""

from __future__ import annotations

import ipaddress
import json
import re

from domum_gateway.errors import ConfigError

__all__ = ["render_config"]

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def _url_host(hostname: str) -> str:
    """The host as it goes in a URL; raises ConfigError when it is neither name nor IP."""
    try:
        address = ipaddress.ip_address(hostname)
    except ValueError:
        name = hostname.rstrip(".")
        if not (0 < len(name) <= 253 and all(_LABEL.match(p) for p in name.split("."))):
            raise ConfigError(f"--hostname {hostname!r} is not a DNS name or IP address") from None
        return name.lower()
    return f"[{address}]" if address.version == 6 else str(address)


def _port(name: str, value: int) -> int:
    if isinstance(value, bool) or not 1 <= value <= 65535:
        raise ConfigError(f"{name} {value!r} is not a port number from 1 to 65535")
    return value


def render_config(
    hostname: str,
    public_port: int = 8443,
    ssh_port: int = 2222,
    admin_port: int = 9443,
) -> str:
    """The configuration file text for a gateway reached at ``hostname``.

    Args:
        hostname: the name (or IP) remote users type; goes into ``public.base_url``.
        public_port, ssh_port, admin_port: the listener ports.

    Raises:
        ConfigError: the hostname or a port is not valid.
    """
    host = _url_host(hostname.strip())
    public_port = _port("public port", public_port)
    ssh_port = _port("ssh port", ssh_port)
    admin_port = _port("admin port", admin_port)
    base_url = json.dumps(f"https://{host}:{public_port}")
    return f"""\
# Domum Gateway configuration.
#
# Relative paths below are relative to the folder holding this file.
# Unknown keys and bad values stop start-up with a message naming the key.
# Point the gateway at another file with --config PATH or DOMUM_CONFIG=PATH.

[public]
# Where the public HTTPS listener (links, portal, web proxy, tunnels) listens.
# IPv6: "[::]:{public_port}".
listen = "0.0.0.0:{public_port}"
# The address remote users reach; personal links are built from it.
base_url = {base_url}
# When set, target NAME is also served at https://NAME.<domain>/ (host routing);
# needs a wildcard DNS record and a certificate for *.<domain>.
domain = ""
# Reverse proxies (CIDRs) whose X-Forwarded-For header is believed, e.g. ["10.0.0.0/8"].
# Origin rules see the connecting address of everyone else.
trusted_proxies = []

[ssh]
# The SSH jump listener: ssh -J user@example.com@{host}:{ssh_port} me@internal-host
listen = "0.0.0.0:{ssh_port}"
# The gateway's own SSH host key (Ed25519, OpenSSH format); created by init.
host_key = "../certs/ssh_host_ed25519_key"
# Seconds an SSH target has, once TCP connects, to finish version and key exchange and
# ask for credentials (browser terminal); typing the password has its own, longer limit.
handshake_timeout = 15.0

[admin]
# Control API (/api/v1), admin console (/admin), /metrics, /healthz, /readyz.
# Keep it on loopback or a management network.
listen = "127.0.0.1:{admin_port}"

[tls]
# Certificate (PEM) and private key served by both HTTPS listeners.
# init creates a local CA and a certificate for {host} when they are missing;
# replace them with ones from your own CA at any time.
cert = "../certs/gateway.crt"
key = "../certs/gateway.key"
# The CA that signed cert: what `domum-gateway connect` and browsers should trust.
ca = "../certs/ca.crt"

[storage]
# "sqlite:///RELATIVE/PATH" or "sqlite:////ABSOLUTE/PATH" for one process, or
# "postgresql://USER:PASSWORD@HOST:5432/DB" for several replicas sharing one database.
url = "sqlite:///../var/domum.db"
# PostgreSQL only: connections each replica keeps open (plus one for notifications),
# and seconds before a statement is abandoned (the request then fails closed).
pool_size = 10
statement_timeout = 5.0

[email]
# SMTP server for links and one-time tokens; leave smtp_host empty to turn e-mail off.
smtp_host = ""
smtp_port = 587
# Upgrade the connection to TLS with STARTTLS before logging in.
starttls = true
# Login, when the server requires one.
username = ""
password = ""
# The From address, e.g. "Domum Gateway <gateway@example.com>"; required with smtp_host.
sender = ""

[sms]
# HTTP SMS provider: POST {{"to", "body"}} as JSON with "Authorization: Bearer <token>".
# Leave url empty to turn SMS off.
url = ""
token = ""

[outbox]
# When neither e-mail nor SMS is configured, messages are written here as files instead.
dir = "../var/outbox"

[retention]
# Days after a grant ends before the personal data of its user is purged.
# Audit events keep a pseudonym.
days = 90

[geoip]
# MaxMind GeoLite2/GeoIP2 Country database (.mmdb) for country origin rules.
# Empty: no database, so policies cannot use country rules.
database = ""

[proxy]
# Seconds to wait for a target to accept a connection.
connect_timeout = 10.0
# Seconds a proxied HTTP request may wait for the target's answer.
read_timeout = 60.0
"""
