"""A local certificate authority for a live federation's SuperLink: `fedtune tls new DIR --host …` writes ca.crt
(what every site trusts), server.crt and server.key (what the SuperLink serves), and ca.key (kept, to issue a
new server certificate later). Made with the `cryptography` library, so no openssl commands are needed."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from fedtune.artifacts import atomic_folder
from fedtune.errors import BadInput

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
TLS_FILES = (CA_CERT, SERVER_CERT, SERVER_KEY)


def new_tls(folder: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """Write a new CA and a server certificate valid for every name or IP address in `hosts` into `folder` (new).

    Returns:
        The files written, by name.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise BadInput("--host: give every name or IP address the sites reach the SuperLink by (repeat)")
    if days < 1:
        raise BadInput(f"--days {days}: a certificate must be valid for at least one day")
    names = [_subject_name(host, x509) for host in hosts]
    if folder.exists() and any(folder.iterdir()):
        raise BadInput(f"{folder}: already holds files; give a new or empty folder")

    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)  # clocks differ a little
    end = start + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    files = {CA_CERT: ca.public_bytes(serialization.Encoding.PEM), CA_KEY: pem_key(ca_key),
             SERVER_CERT: server.public_bytes(serialization.Encoding.PEM), SERVER_KEY: pem_key(server_key)}
    with atomic_folder(folder, replace=folder.exists(), private=(CA_KEY, SERVER_KEY)) as tmp:
        for name, data in files.items():
            path = tmp / name
            path.touch(mode=0o600 if name in (CA_KEY, SERVER_KEY) else 0o644)
            path.write_bytes(data)
    return {name: folder / name for name in files}


def tls_files(folder: Path, option: str = "--tls", hosts: tuple[str, ...] = ()) -> dict[str, Path]:
    """The SuperLink's certificate files in `folder` (as `new_tls` writes them), each checked to exist, and the
    server certificate checked to name every one of `hosts`."""
    from cryptography import x509

    found = {name: (folder / name).resolve() for name in TLS_FILES}
    for name, path in found.items():
        if not path.is_file():
            raise BadInput(f"{option} {folder}: {name} missing; make the folder with `fedtune tls new {folder} --host "
                           "HOST`")
    try:
        certificate = x509.load_pem_x509_certificate(found[SERVER_CERT].read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        raise BadInput(f"{found[SERVER_CERT]}: not a server certificate with the names it serves; make one with "
                       f"`fedtune tls new DIR --host HOST`") from None
    named = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} | set(names.get_values_for_type(x509.DNSName))
    for host in hosts:
        if host.strip("[]") not in named:
            raise BadInput(f"{found[SERVER_CERT]}: does not name {host} ({', '.join(sorted(named))}), where the "
                           f"SuperLink is reached; make the folder again with `fedtune tls new DIR --host {host} …`")
    return found


def _subject_name(host: str, x509):
    """An IP address or a DNS name for the certificate's subjectAltName."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not host or any(ch.isspace() or ch in "/:@" for ch in host):
        raise BadInput(f"--host {host!r}: not a host name or an IP address")
    return x509.DNSName(host)
