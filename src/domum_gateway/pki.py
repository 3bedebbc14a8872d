"""Local PKI for a fresh install: a private CA, a TLS leaf it signs, an SSH host key.

``domum-gateway init`` calls the ``ensure_*`` functions; each creates what is missing
and never overwrites a file that exists (it returns False: "kept"), so operators can
drop in certificates from their own CA at any time. Private keys are written with mode
0600 and appear atomically: a crash leaves either no file or a complete one.

Keys are ECDSA P-256 (every browser and TLS stack accepts them); the SSH host key is
Ed25519 in OpenSSH format.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import ssl
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization.ssh import SSHPublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from domum_gateway.errors import ConfigError

__all__ = [
    "CA_COMMON_NAME",
    "CA_VALIDITY",
    "LEAF_VALIDITY",
    "client_ssl_context",
    "ensure_ca",
    "ensure_leaf",
    "ensure_ssh_host_key",
    "make_test_pki",
    "server_ssl_context",
]

CA_COMMON_NAME = "Domum Gateway local CA"
CA_VALIDITY = timedelta(days=3650)
# The longest lifetime Apple platforms and Chrome accept for a TLS server certificate.
LEAF_VALIDITY = timedelta(days=825)
# Tolerate clients whose clocks run a little behind ours.
_BACKDATE = timedelta(minutes=5)

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ensure_ca(cert_path: Path, key_path: Path) -> bool:
    """Create a self-signed CA at ``cert_path``/``key_path`` unless the certificate exists.

    A key left without its certificate (an interrupted run) is reused, not replaced.

    Returns:
        True when a certificate was written, False when an existing one was kept.

    Raises:
        ConfigError: a file cannot be written, or an existing key cannot be read.
    """
    if cert_path.exists():
        return False
    key = _load_or_create_key(key_path)
    now = datetime.now(UTC)
    # A random OU keeps subjects of different installs apart in one trust store.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Domum Gateway"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, secrets.token_hex(8)),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def ensure_leaf(
    cert_path: Path,
    key_path: Path,
    ca_cert_path: Path,
    ca_key_path: Path,
    hostname: str,
    extra_names: Iterable[str] = (),
) -> bool:
    """Create a TLS server certificate for ``hostname`` signed by the CA, unless one exists.

    The certificate names ``hostname`` (as an IP address when it is one), ``localhost``,
    127.0.0.1 and ::1, plus ``extra_names`` (for example ``*.{public.domain}``). The file
    holds the leaf only: clients trust the CA certificate.

    Returns:
        True when a certificate was written, False when an existing one was kept.

    Raises:
        ConfigError: the CA cannot be read, a name is invalid, or a file cannot be written.
    """
    if cert_path.exists():
        return False
    names = _subject_alt_names([hostname, "localhost", "127.0.0.1", "::1", *extra_names])
    ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path)
    key = _load_or_create_key(key_path)
    public = key.public_key()
    now = datetime.now(UTC)
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def ensure_ssh_host_key(path: Path) -> bool:
    """Create an Ed25519 SSH host key (OpenSSH format) at ``path`` and ``path.pub``.

    An existing private key is kept; a missing ``.pub`` beside it is derived from it.

    Returns:
        True when a private key was written, False when an existing one was kept.

    Raises:
        ConfigError: the file cannot be written, or the existing key cannot be read.
    """
    pub_path = path.with_name(path.name + ".pub")
    if path.exists():
        if not pub_path.exists():
            _write_file(pub_path, _ssh_public_line(_read_ssh_private_key(path)), 0o644)
        return False
    new_key = ed25519.Ed25519PrivateKey.generate()
    pem = new_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    created = _write_file(path, pem, 0o600)
    if created:
        with contextlib.suppress(FileNotFoundError):
            pub_path.unlink()  # a .pub without its private key belongs to some other key
        _write_file(pub_path, _ssh_public_line(new_key.public_key()), 0o644)
    return created


def make_test_pki(dir: Path, hostname: str = "localhost") -> tuple[Path, Path, Path]:
    """A CA and a leaf for ``hostname`` under ``dir``; returns (cert, key, ca cert)."""
    ca_cert, ca_key = dir / "ca.crt", dir / "ca.key"
    cert, key = dir / "gateway.crt", dir / "gateway.key"
    ensure_ca(ca_cert, ca_key)
    ensure_leaf(cert, key, ca_cert, ca_key, hostname)
    return cert, key, ca_cert


def client_ssl_context(ca_path: Path) -> ssl.SSLContext:
    """A client context that trusts only ``ca_path`` and checks the host name.

    Raises:
        ConfigError: the CA file is missing or not a PEM certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(ca_path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{ca_path}: cannot load CA certificate: {exc}") from None
    return context


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context: TLS 1.2 or newer, no compression, no renegotiation.

    Raises:
        ConfigError: the certificate or key is missing, unreadable or mismatched.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{cert}, {key}: cannot load TLS certificate and key: {exc}") from None
    return context


def _subject_alt_names(values: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in values:
        value = raw.strip().rstrip(".").lower()
        if value.startswith("[") and value.endswith("]"):
            value = value[1:-1]
        general: x509.GeneralName
        try:
            address: _IPAddress = ipaddress.ip_address(value)
        except ValueError:
            if not value or not value.isascii() or any(c in value for c in " /:@\\"):
                raise ConfigError(
                    f"{raw!r} is not a host name (use its ASCII/punycode form) or IP address"
                ) from None
            key = f"dns:{value}"
            general = x509.DNSName(value)
        else:
            key = f"ip:{address}"
            general = x509.IPAddress(address)
        if key not in seen:
            seen.add(key)
            names.append(general)
    return names


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"cannot issue a certificate: CA {cert_path} / {key_path} unreadable: {exc}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: expected an EC private key for the local CA")
    return cert, key


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: cannot read private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{path}: expected an EC private key; move it aside to make one")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if not _write_file(path, pem, 0o600):
        # Another process wrote it between our check and our write: use theirs.
        return _load_or_create_key(path)
    return key


def _read_ssh_private_key(path: Path) -> SSHPublicKeyTypes:
    """The public half of an existing host key, in OpenSSH or (legacy) PEM format."""
    try:
        data = path.read_bytes()
        try:
            return serialization.load_ssh_private_key(data, password=None).public_key()
        except ValueError:
            public = serialization.load_pem_private_key(data, password=None).public_key()
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read the SSH host key: {exc}") from None
    if not isinstance(
        public,
        ec.EllipticCurvePublicKey | rsa.RSAPublicKey | dsa.DSAPublicKey | ed25519.Ed25519PublicKey,
    ):
        raise ConfigError(f"{path}: not a key type SSH can use as a host key")
    return public


def _ssh_public_line(key: SSHPublicKeyTypes) -> bytes:
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + b" domum-gateway\n"


def _write_file(path: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` to a new file at ``path``; False if it already exists.

    The bytes go to a temporary file created 0600 with O_EXCL, are synced, then linked
    into place: ``link`` fails rather than replace an existing file.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if mode != 0o600:
                os.chmod(tmp, mode)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:
                # No hard links on this file system: rename, after a last look.
                if path.exists():
                    return False
                os.rename(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return True
