"""TLS for a broker that listens beyond loopback: a private CA made on first start.

No public CA is needed: the control plane makes its own CA and a server
certificate for the fixed name `netmesh-nats` (clients check that name, not
the address they dialled, so the broker may be reached by any address), and
every enrollment token carries the CA certificate. Made with the `openssl`
command (installed with the system packages); the CA key stays in the data dir
(0600) and signs nothing but the broker's certificate.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from events.connect import BROKER_TLS_NAME


class BrokerTlsError(Exception):
    pass


@dataclass(frozen=True)
class BrokerTls:
    ca_cert: Path
    cert: Path
    key: Path

    def ca_der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.ca_cert.read_text())

    def config(self) -> str:
        """The nats-server `tls` block. Handshake first: a client that expects
        TLS starts it before reading anything, so nobody in between can talk
        it out of TLS by editing the server's plaintext INFO."""
        return (
            "tls {\n"
            f'  cert_file: "{self.cert}"\n'
            f'  key_file: "{self.key}"\n'
            "  handshake_first: true\n"
            "  timeout: 5\n"
            "}\n"
        )


def _openssl(*args: str) -> None:
    try:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise BrokerTlsError("openssl not found: install it (make setup does)") from None
    except subprocess.CalledProcessError as exc:
        why = exc.stderr.decode(errors="replace").strip().splitlines()
        raise BrokerTlsError(f"openssl {args[0]} failed: {why[-1] if why else exc}") from None


def ensure_broker_tls(data_dir: Path) -> BrokerTls:
    """The CA and server certificate under `<data-dir>/tls`, made if missing."""
    tls_dir = data_dir / "tls"
    files = BrokerTls(tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key")
    if files.ca_cert.exists() and files.cert.exists() and files.key.exists():
        return files
    tls_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(tls_dir, 0o700)
    # Made in a scratch dir and moved in: a failure leaves nothing half-made.
    with tempfile.TemporaryDirectory(dir=tls_dir) as scratch:
        work = Path(scratch)
        curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
        _openssl(
            "req", "-x509", *curve,
            "-keyout", str(work / "ca.key"), "-out", str(work / "ca.pem"),
            "-days", "3650", "-subj", "/CN=netmesh broker CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        _openssl(
            "req", "-new", *curve,
            "-keyout", str(work / "server.key"), "-out", str(work / "server.csr"),
            "-subj", f"/CN={BROKER_TLS_NAME}",
        )  # fmt: skip
        (work / "server.ext").write_text(
            f"subjectAltName=DNS:{BROKER_TLS_NAME}\n"
            "extendedKeyUsage=serverAuth\n"
            "keyUsage=critical,digitalSignature\n"
        )
        _openssl(
            "x509", "-req", "-in", str(work / "server.csr"),
            "-CA", str(work / "ca.pem"), "-CAkey", str(work / "ca.key"), "-CAcreateserial",
            "-out", str(work / "server.pem"), "-days", "3650",
            "-extfile", str(work / "server.ext"),
        )  # fmt: skip
        for name in ("ca.key", "server.key"):
            os.chmod(work / name, 0o600)
        for name in ("ca.key", "server.key", "server.pem", "ca.pem"):  # ca.pem last
            (work / name).replace(tls_dir / name)
    return files
