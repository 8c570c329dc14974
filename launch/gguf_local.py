"""Local GGUF files as `--target`/`--draft`: one file, or the parts of a split model.

A path ending in `.gguf` is converted once, as the default pair's GGUF is (`model_store.convert`:
transformers' GGUF loader, a bf16 safetensors directory with a manifest), into
`models/gguf-<stem>-<id>/` of the cache; the id hashes each file's path, size and modification
time, so an edited file is converted again and later runs load the converted directory.

Split models are named `<stem>-00001-of-00003.gguf` (any part may be given; all must exist).
Parts written by llama.cpp's `gguf-split` are GGUF files each (metadata in the first, tensors
spread over all): they are merged into one file with the `gguf` library. Parts that are plain
byte ranges of one file (as our PyPI wheels hold) are concatenated.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from specexec.launch import model_store
from specexec.launch.model_store import ModelStoreError, PackagedModel

SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
MAGIC = b"GGUF"


def is_gguf(name_or_path: str) -> bool:
    return name_or_path.lower().endswith(".gguf")


def parts(path: Path) -> list[Path]:
    """`path` alone, or every part of the split model it belongs to, in order."""
    match = SPLIT.match(path.name)
    files = [path] if not match else [
        path.with_name(f"{match['stem']}-{i:05d}-of-{match['count']}.gguf") for i in range(1, int(match["count"]) + 1)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelStoreError(f"GGUF file {missing[0]} does not exist"
                              + (f" (part of a {len(files)}-part model)" if match else ""))
    return files


def stem(path: Path) -> str:
    match = SPLIT.match(path.name)
    return match["stem"] if match else path.stem


def identity(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _starts_with_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == MAGIC


def resolve(name_or_path: str) -> str:
    """The converted directory for a local GGUF (converting it on first use)."""
    files = parts(Path(name_or_path).expanduser())
    if not _starts_with_magic(files[0]):
        raise ModelStoreError(f"{files[0]} is not a GGUF file (it does not start with 'GGUF')")
    digest = identity(files)
    model = PackagedModel(name=f"gguf-{stem(files[0])}-{digest[:12]}", hf_name=stem(files[0]), package_prefix="",
                          n_parts=len(files), version="local", sha256=digest)
    if model_store.is_converted(model) and not model_store.damage(model, checksums=False):
        return str(model_store.converted_dir(model))
    single = files[0] if len(files) == 1 else _joined(files, model)
    try:
        model_store.convert(model, single)
    except ModelStoreError:
        raise
    except Exception as err:  # the gguf reader's and transformers' errors on a damaged or unsupported file
        raise ModelStoreError(f"cannot load GGUF {files[0]}" + (f" (+{len(files) - 1} parts)" if len(files) > 1 else "")
                              + f": {type(err).__name__}: {err}") from None
    finally:
        if single not in files:
            single.unlink(missing_ok=True)
    return str(model_store.converted_dir(model))


def _joined(files: list[Path], model: PackagedModel) -> Path:
    """One GGUF from the parts, in the cache's gguf/ folder (removed after conversion)."""
    out = model_store.home() / "gguf" / f"{model.name}.gguf"
    with model_store._writing(out, f"joining the parts of {files[0].name}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        if all(_starts_with_magic(f) for f in files[1:]):
            merge_shards(files, out)
        else:
            with open(out, "wb") as sink:
                for f in files:
                    with open(f, "rb") as src:
                        while chunk := src.read(1 << 22):
                            sink.write(chunk)
    return out


def merge_shards(files: list[Path], out: Path) -> None:
    """llama.cpp `gguf-split` shards -> one GGUF: the first shard's metadata (less split.*), every
    shard's tensors in order."""
    import gguf
    readers = []
    for f in files:
        try:
            readers.append(gguf.GGUFReader(str(f)))
        except Exception as err:
            raise ModelStoreError(f"GGUF part {f} is damaged: {type(err).__name__}: {err}") from None
    first = readers[0]
    arch = first.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=first.endianess)
    for field in first.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", "split.")):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    tensors = [(r, t) for r in readers for t in r.tensors]
    for _, t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for reader, t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
