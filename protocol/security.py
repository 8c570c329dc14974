"""Socket security shared by both roles: ZeroMQ CURVE keys, heartbeats, shared HMAC keys.

CURVE layout of a key directory (`specexec keys generate DIR`):
    DIR/server.key, DIR/server.key_secret     the verifier's keypair
    DIR/client.key, DIR/client.key_secret     a drafter's keypair
    DIR/authorized/*.key                      public keys of drafters the verifier admits
    DIR/hmac.key                              shared HMAC key for message signing
The GPU box needs server.key_secret and authorized/; a laptop needs client.key_secret,
server.key and hmac.key.

Secret files are created 0600 from the first byte (`os.open` with the mode, whatever the
umask), existing keys are never overwritten unless `force`, and a secret file that group or
others may read is refused, naming the file (as ssh does).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import zmq
import zmq.auth

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
MAX_CONNECTIONS = 256  # the default of `serve --max-connections` (verifier/connection_cap.py enforces it)
HANDSHAKE_MS = 5000  # a verifier closes a connection that has not completed its ZMTP/CURVE handshake by then
SECRET_FILES = ("server.key_secret", "client.key_secret", "hmac.key")
PUBLIC_FILES = ("server.key", "client.key", "authorized/client.key")


class KeyExistsError(FileExistsError):
    """`generate_keys` would overwrite keys that exist; pass force=True (`--force`) to replace them."""


def generate_keys(directory: str | Path, force: bool = False) -> Path:
    """Write both CURVE keypairs, the authorized client key and a shared HMAC key into DIR.

    Refuses (KeyExistsError) when any of these files exists, unless `force`."""
    d = Path(directory).expanduser()
    existing = [name for name in SECRET_FILES + PUBLIC_FILES if (d / name).exists()]
    if existing and not force:
        raise KeyExistsError(f"{d / existing[0]} already exists: refusing to overwrite keys "
                             "(pass --force to replace every key in this directory)")
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        public, secret = zmq.curve_keypair()
        _write(d / f"{name}.key", _certificate(public), secret=False)
        _write(d / f"{name}.key_secret", _certificate(public, secret), secret=True)
        if name == "client":
            _write(d / "authorized" / "client.key", _certificate(public), secret=False)
    _write(d / "hmac.key", (secrets.token_hex(32) + "\n").encode(), secret=True)
    return d


def _certificate(public: bytes, secret: bytes | None = None) -> bytes:
    """A ZeroMQ certificate file, as `zmq.auth.load_certificate` reads it."""
    lines = ["#   ZeroMQ CURVE " + ("**Secret** Certificate" if secret else "Public Certificate"),
             "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return ("\n".join(lines) + "\n").encode()


def _write(path: Path, data: bytes, secret: bool) -> None:
    """Create `path` afresh with its final mode from the first byte (a replaced file is unlinked first)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    try:
        os.fchmod(fd, 0o600 if secret else 0o644)  # the umask may have cleared bits, never added any
        os.write(fd, data)
    finally:
        os.close(fd)


def check_private(path: Path) -> None:
    """Refuse a secret file that group or others may read or write, naming it (as ssh does)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        what = "readable" if mode & 0o044 else "writable"
        raise ValueError(f"{path} is {what} by group or others (mode {mode:04o}): keys must be private; "
                         f"run `chmod 600 {path}`")


def _load(path: Path, secret: bool):
    if not path.is_file():
        raise ValueError(f"CURVE key file {path} is missing (create keys with `specexec keys generate DIR`)")
    if secret:
        check_private(path)
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
