"""Socket security shared by both roles: ZeroMQ CURVE keys, heartbeats, shared HMAC keys.

CURVE layout of a key directory (`specexec keys generate DIR`):
    DIR/server.key, DIR/server.key_secret     the verifier's keypair
    DIR/client.key, DIR/client.key_secret     a drafter's keypair
    DIR/authorized/*.key                      public keys of drafters the verifier admits
    DIR/hmac.key                              shared HMAC key for message signing
The GPU box needs server.key_secret and authorized/; a laptop needs client.key_secret,
server.key and hmac.key.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import zmq
import zmq.auth

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000


def generate_keys(directory: str | Path) -> Path:
    d = Path(directory).expanduser()
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(d), "server")
    _, client_secret = zmq.auth.create_certificates(str(d), "client")
    shutil.copy(d / "client.key", d / "authorized" / "client.key")
    hmac_key = d / "hmac.key"
    hmac_key.write_text(secrets.token_hex(32) + "\n")
    for secret in (d / "server.key_secret", d / "client.key_secret", hmac_key):
        os.chmod(secret, 0o600)
    return d


def _load(path: Path, secret: bool):
    if not path.is_file():
        raise ValueError(f"CURVE key file {path} is missing (create keys with `specexec keys generate DIR`)")
    public, secret_key = zmq.auth.load_certificate(str(path))
    if secret and secret_key is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret_key


def heartbeat(sock: zmq.Socket) -> None:
    """ZMTP heartbeats: libzmq pings the peer and drops a connection silent for the timeout."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)


def curve_server(ctx: zmq.Context, sock: zmq.Socket, directory: str | Path):
    """Make `sock` a CURVE server admitting the keys in DIR/authorized; returns the authenticator."""
    from zmq.auth.thread import ThreadAuthenticator
    d = Path(directory).expanduser()
    public, secret = _load(d / "server.key_secret", secret=True)
    authorized = d / "authorized"
    if not authorized.is_dir() or not any(authorized.glob("*.key")):
        raise ValueError(f"{authorized} holds no client public keys: no drafter could connect")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(authorized))
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    return auth


def curve_client(sock: zmq.Socket, directory: str | Path) -> None:
    d = Path(directory).expanduser()
    public, secret = _load(d / "client.key_secret", secret=True)
    server_public, _ = _load(d / "server.key", secret=False)
    sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = secret, public, server_public
