"""Certificates and keys for a secure Flower deployment (`caff certs`).

- A certificate authority (``ca.crt``, ``ca.key``) and the SuperLink's certificate signed by it
  (``server.pem``, ``server.key``), valid for the host names and IP addresses the nodes dial
  (a subject alternative name each). The SuperLink serves TLS with them; SuperNodes and the
  ``flwr`` CLI trust ``ca.crt``.
- One key pair per SuperNode (``NAME``, ``NAME.pub``): EC on NIST P-384, OpenSSH format, as
  Flower's node authentication wants. The public key is registered with the SuperLink
  (``flwr supernode register NAME.pub CONNECTION``); the node signs with the private key.

Private keys are written with mode 0600 and no passphrase; keep ``ca.key`` off the servers.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    """Write ``data`` to ``path``, readable by its owner only when ``private``; refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certificates(folder: str | Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """A CA and a SuperLink certificate for ``hosts`` (names or IP addresses) in ``folder``;
    returns their paths by role: ca, ca_key, server, server_key."""
    if not hosts:
        raise ValueError("certificates need at least one host name or IP address the nodes dial")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if taken := [n for n in ("ca.crt", "ca.key", "server.pem", "server.key") if (folder / n).exists()]:
        raise ValueError(f"{folder} already holds {', '.join(taken)}: choose another folder")
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "caff Flower CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])).issuer_name(ca_name)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(valid[0]).not_valid_after(valid[1])
              .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    return {"ca": _write(folder / "ca.crt", ca.public_bytes(serialization.Encoding.PEM)),
            "ca_key": _write(folder / "ca.key", _pem_key(ca_key), private=True),
            "server": _write(folder / "server.pem", server.public_bytes(serialization.Encoding.PEM)),
            "server_key": _write(folder / "server.key", _pem_key(server_key), private=True)}


def make_node_key(folder: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair in ``folder``: (private key ``name``, public key ``name.pub``), OpenSSH format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / name).exists() or (folder / f"{name}.pub").exists():
        raise ValueError(f"{folder / name} already exists: choose another name")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return _write(folder / name, private, private=True), _write(folder / f"{name}.pub", public + b"\n")
