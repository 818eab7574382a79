"""A throwaway certificate authority for the local broker's TLS listeners (tests and trials, never production).

``make_pki(folder)`` writes, with the ``openssl`` command: a CA, a broker certificate for ``127.0.0.1`` and
``localhost`` (so clients verify the host name as they do by default), a client certificate for mutual TLS (its key
also encrypted with ``KEY_PASSWORD``), and an unrelated CA that trusts none of them (for tests of a wrong
``ssl_cafile``). Keys are PKCS#8 PEM files readable only by their owner; certificates last two days.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pipeline.localinfra._util import LocalInfraError

#: The password of ``Pki.client_key_encrypted``.
KEY_PASSWORD = "client-key-password"

_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-noenc"]


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files ``make_pki`` wrote."""

    ca: Path  # the CA certificate: clients' ssl_cafile, the broker's truststore
    broker_keystore: Path  # the broker's private key followed by its certificate (Kafka's PEM keystore)
    client_cert: Path
    client_key: Path
    client_key_encrypted: Path  # client_key encrypted with the password ``KEY_PASSWORD``
    other_ca: Path  # a CA that signed none of these


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise LocalInfraError("the openssl command is needed for the local broker's TLS listeners "
                              "(Debian: apt-get install openssl)")
    proc = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode != 0:
        raise LocalInfraError(f"openssl {args[0]} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


def _self_signed_ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=sensorwatch {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def _signed(folder: Path, name: str, subject: str, extensions: str) -> None:
    _openssl("req", "-new", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder)
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


def make_pki(folder: Path) -> Pki:
    """Create the CA, broker and client certificates in ``folder`` (made if missing); LocalInfraError on failure."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _self_signed_ca(folder, "ca")
    _self_signed_ca(folder, "other-ca")
    _signed(folder, "broker", "/CN=localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _signed(folder, "client", "/CN=sensorwatch", "extendedKeyUsage=clientAuth\n")
    _openssl("pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", "client.key", "-out", "client-encrypted.key",
             "-passout", f"pass:{KEY_PASSWORD}", cwd=folder)
    keystore = folder / "broker-keystore.pem"
    keystore.write_text((folder / "broker.key").read_text() + (folder / "broker.pem").read_text())
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    keystore.chmod(0o600)
    return Pki(ca=folder / "ca.pem", broker_keystore=keystore, client_cert=folder / "client.pem",
               client_key=folder / "client.key", client_key_encrypted=folder / "client-encrypted.key",
               other_ca=folder / "other-ca.pem")
