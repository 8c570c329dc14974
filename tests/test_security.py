"""Keys as operators expect from ssh: private from the first byte, never overwritten silently,
refused when others can read them."""

import os
import stat
import threading

import pytest

from specexec.protocol.framing import key_from_env, load_key
from specexec.protocol.security import SECRET_FILES, KeyExistsError, curve_client, generate_keys

SECRETS = ("server.key_secret", "client.key_secret", "hmac.key")


def test_generated_secrets_are_0600_from_the_first_byte_whatever_the_umask(tmp_path):
    seen = {}
    stop = threading.Event()
    d = tmp_path / "keys"

    def watch():  # look at the files as they appear: no moment may show a group/other bit
        while not stop.is_set():
            for name in SECRETS:
                try:
                    mode = os.stat(d / name).st_mode
                except FileNotFoundError:
                    continue
                seen[name] = seen.get(name, 0) | mode

    old = os.umask(0)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        generate_keys(d)
    finally:
        stop.set()
        watcher.join()
        os.umask(old)
    for name in SECRETS:
        assert stat.S_IMODE(os.stat(d / name).st_mode) == 0o600, name
        assert not seen.get(name, 0) & 0o077, (name, oct(seen.get(name, 0)))
    assert set(SECRETS) <= set(SECRET_FILES)


def test_existing_keys_are_not_overwritten_without_force(tmp_path):
    d = generate_keys(tmp_path / "keys")
    before = {n: (d / n).read_bytes() for n in SECRETS}
    with pytest.raises(KeyExistsError, match="key_secret already exists: refusing to overwrite keys") as err:
        generate_keys(d)
    assert "--force" in str(err.value)
    assert {n: (d / n).read_bytes() for n in SECRETS} == before
    generate_keys(d, force=True)
    assert all((d / n).read_bytes() != before[n] for n in SECRETS)
    assert all(stat.S_IMODE(os.stat(d / n).st_mode) == 0o600 for n in SECRETS)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_key_files_readable_by_others_are_refused_naming_the_file(tmp_path, mode):
    d = generate_keys(tmp_path / "keys")
    os.chmod(d / "hmac.key", mode)
    with pytest.raises(ValueError, match=f"{d / 'hmac.key'}.*readable by group or others.*chmod 600"):
        load_key(d / "hmac.key")
    os.chmod(d / "client.key_secret", mode)
    import zmq
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        with pytest.raises(ValueError, match="client.key_secret.*readable by group or others"):
            curve_client(sock, d)


def test_a_key_from_the_environment_obeys_the_16_byte_minimum():
    with pytest.raises(ValueError, match="SPECEXEC_HMAC_KEY holds 5 bytes; use at least 16"):
        key_from_env("short")
    assert key_from_env("k" * 16) == b"k" * 16
    assert key_from_env("") is None and key_from_env(None) is None
