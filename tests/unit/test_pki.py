"""Local PKI: what init creates, that it never overwrites, and that real TLS accepts it."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from domum_gateway.errors import ConfigError
from domum_gateway.pki import (
    CA_COMMON_NAME,
    client_ssl_context,
    ensure_ca,
    ensure_leaf,
    ensure_ssh_host_key,
    make_test_pki,
    server_ssl_context,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_test_pki(tmp_path_factory.mktemp("pki") / "certs", "gateway.example.com")


def test_ca_shape(tmp_path: Path) -> None:
    cert_path, key_path = tmp_path / "certs" / "ca.crt", tmp_path / "certs" / "ca.key"
    assert ensure_ca(cert_path, key_path) is True
    assert mode(key_path) == 0o600
    cert = load_cert(cert_path)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (CA_COMMON_NAME)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 3649 <= lifetime.days <= 3651
    cert.verify_directly_issued_by(cert)


def test_leaf_shape(pki: tuple[Path, Path, Path]) -> None:
    cert_path, key_path, ca_path = pki
    assert mode(key_path) == 0o600
    assert mode(ca_path.with_name("ca.key")) == 0o600
    cert, ca = load_cert(cert_path), load_cert(ca_path)
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gateway.example.com", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 824 <= lifetime.days <= 826
    # The leaf file holds one certificate: the leaf.
    assert cert_path.read_bytes().count(b"BEGIN CERTIFICATE") == 1
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_ip_hostname_goes_in_as_ip_address(tmp_path: Path) -> None:
    cert_path, _, _ = make_test_pki(tmp_path, "192.0.2.10")
    san = load_cert(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ipaddress.ip_address("192.0.2.10") in san.value.get_values_for_type(x509.IPAddress)


def test_extra_names_and_no_duplicates(tmp_path: Path) -> None:
    ca, ca_key = tmp_path / "ca.crt", tmp_path / "ca.key"
    ensure_ca(ca, ca_key)
    leaf = tmp_path / "leaf.crt"
    ensure_leaf(leaf, tmp_path / "leaf.key", ca, ca_key, "localhost", ["*.apps.example.com"])
    san = load_cert(leaf).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost", "*.apps.example.com"]
    assert len(san.value.get_values_for_type(x509.IPAddress)) == 2


def test_bad_hostname_is_config_error(tmp_path: Path) -> None:
    ca, ca_key = tmp_path / "ca.crt", tmp_path / "ca.key"
    ensure_ca(ca, ca_key)
    with pytest.raises(ConfigError):
        ensure_leaf(tmp_path / "l.crt", tmp_path / "l.key", ca, ca_key, "bad host")
    with pytest.raises(ConfigError):
        ensure_leaf(tmp_path / "l.crt", tmp_path / "l.key", ca, ca_key, "bücher.example")
    assert not (tmp_path / "l.crt").exists()


def test_missing_ca_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot issue"):
        ensure_leaf(
            tmp_path / "l.crt",
            tmp_path / "l.key",
            tmp_path / "no.crt",
            tmp_path / "no.key",
            "localhost",
        )


def test_rerun_keeps_every_file_byte_for_byte(tmp_path: Path) -> None:
    cert, key, ca = make_test_pki(tmp_path)
    ssh_key = tmp_path / "ssh_host_ed25519_key"
    assert ensure_ssh_host_key(ssh_key) is True
    files = [cert, key, ca, tmp_path / "ca.key", ssh_key, ssh_key.with_name(ssh_key.name + ".pub")]
    before = {path: path.read_bytes() for path in files}
    assert ensure_ca(ca, tmp_path / "ca.key") is False
    assert ensure_leaf(cert, key, ca, tmp_path / "ca.key", "other.example.com") is False
    assert ensure_ssh_host_key(ssh_key) is False
    assert make_test_pki(tmp_path) == (cert, key, ca)
    assert {path: path.read_bytes() for path in files} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)


def test_orphan_key_is_reused_not_replaced(tmp_path: Path) -> None:
    ca, ca_key = tmp_path / "ca.crt", tmp_path / "ca.key"
    ensure_ca(ca, ca_key)
    ca.unlink()  # as if a run stopped between writing the key and the certificate
    key_bytes = ca_key.read_bytes()
    assert ensure_ca(ca, ca_key) is True
    assert ca_key.read_bytes() == key_bytes
    key = serialization.load_pem_private_key(key_bytes, password=None)
    assert load_cert(ca).public_key() == key.public_key()


def test_unwritable_folder_is_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write"):
        ensure_ca(blocker / "ca.crt", blocker / "ca.key")


async def test_ssh_host_key_loads_with_asyncssh(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "ssh_host_ed25519_key"
    assert ensure_ssh_host_key(path) is True
    assert mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key = asyncssh.read_private_key(path)
    assert key.get_algorithm() == "ssh-ed25519"
    pub_path = path.with_name(path.name + ".pub")
    assert pub_path.read_text().startswith("ssh-ed25519 ")
    assert asyncssh.read_public_key(pub_path) == key.convert_to_public()


def test_missing_ssh_pub_is_derived(tmp_path: Path) -> None:
    path = tmp_path / "ssh_host_ed25519_key"
    ensure_ssh_host_key(path)
    pub_path = path.with_name(path.name + ".pub")
    pub = pub_path.read_bytes()
    pub_path.unlink()
    assert ensure_ssh_host_key(path) is False
    assert pub_path.read_bytes() == pub


# --- real TLS handshakes ----------------------------------------------------------------


@pytest.fixture
async def tls_server(pki: tuple[Path, Path, Path]) -> AsyncIterator[int]:
    cert, key, _ = pki

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.readexactly(4))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ssl_context(cert, key))
    async with server:
        yield server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1", "gateway.example.com"])
async def test_handshake_verifies_against_ca(
    pki: tuple[Path, Path, Path], tls_server: int, server_hostname: str
) -> None:
    context = client_ssl_context(pki[2])
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # the default from Python 3.13 on
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", tls_server, ssl=context, server_hostname=server_hostname
    )
    try:
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        tls = writer.get_extra_info("ssl_object")
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        writer.close()
        await writer.wait_closed()


async def test_handshake_fails_for_other_name(pki: tuple[Path, Path, Path], tls_server: int) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            "127.0.0.1",
            tls_server,
            ssl=client_ssl_context(pki[2]),
            server_hostname="intruder.example.org",
        )


async def test_handshake_fails_with_another_ca(tls_server: int, tmp_path: Path) -> None:
    _, _, other_ca = make_test_pki(tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            "127.0.0.1", tls_server, ssl=client_ssl_context(other_ca), server_hostname="localhost"
        )


def test_server_context_settings(pki: tuple[Path, Path, Path]) -> None:
    context = server_ssl_context(pki[0], pki[1])
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert client_ssl_context(pki[2]).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client_ssl_context(pki[2]).check_hostname


def test_context_errors_are_config_errors(tmp_path: Path, pki: tuple[Path, Path, Path]) -> None:
    with pytest.raises(ConfigError):
        client_ssl_context(tmp_path / "missing.crt")
    with pytest.raises(ConfigError):
        server_ssl_context(tmp_path / "missing.crt", tmp_path / "missing.key")
    other_cert, _, _ = make_test_pki(tmp_path)
    with pytest.raises(ConfigError):
        server_ssl_context(other_cert, pki[1])  # key does not match


def test_pub_derived_from_a_pem_host_key_supplied_by_the_operator(tmp_path: Path) -> None:
    path = tmp_path / "ssh_host_ecdsa_key"
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    assert ensure_ssh_host_key(path) is False
    assert path.read_bytes() == pem
    pub = asyncssh.read_public_key(path.with_name(path.name + ".pub"))
    assert pub == asyncssh.read_private_key(path).convert_to_public()


def test_unreadable_host_key_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "ssh_host_ed25519_key"
    path.write_text("not a key")
    with pytest.raises(ConfigError, match="cannot read the SSH host key"):
        ensure_ssh_host_key(path)
