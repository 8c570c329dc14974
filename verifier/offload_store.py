"""The offload folder of the disk streamer: one aligned file per decoder layer, a JSON manifest.

Layout of `FOLDER`:

  manifest.json      {"format", "align", "source": {model, files, dtype, layers}, "layers": {i: entry}}
  layer_007.bin      layer 7's tensors back to back, each at a multiple of ALIGN (4096) bytes,
                     the file padded to a multiple of ALIGN: one read of the whole file fills a
                     layer buffer, and O_DIRECT's alignment rules (buffer, offset and length
                     multiples of the logical block size) hold for every read.
  embeddings.bin     the input embedding table (same format, one tensor), read a row at a time
                     (`read_rows`: the one or two aligned pages holding a row).

An entry names its file, its size, its sha256 checksum and, per tensor, the name (relative
to the layer), dtype, shape, offset and byte count.

What is checked when:
- at start-up (`OffloadStore.open` then `ensure`): a manifest whose `source` differs from the
  model's (model path, size and mtime of its weight files, dtype, layer count, a fingerprint of
  the weights) is discarded and the folder rewritten; with a matching one, every layer file the
  run needs is read once and its size and sha256 compared, and a mismatch is refused with an
  error naming the file; a layer the manifest lacks is written and added. Cost: one sequential
  read of the streamed bytes plus sha256 (SHA-NI: 0.5 GB/s on a busy 2-core Xeon, 1.5+ GB/s
  idle): 2.7 GB for the default target at cpu=1GiB (24 layers and the embeddings), measured
  16-26 s of start-up on a 2-core Xeon at load average 12, a few seconds idle.
- on every read (`read_into`, `read_rows`), the file's size is compared with the manifest (an fstat: free) and
  a short read is refused; the checksum is not recomputed per pass (CPU time on every layer).

Reads bypass the page cache with O_DIRECT into 4096-aligned buffers, so what the verifier keeps
in RAM is what its placement says, and a read costs what the disk costs whatever other processes
have read before. O_DIRECT rather than buffered reads + DONTNEED because the pages then never
enter the cache at all (no window where a layer is charged twice, no reliance on the kernel
honouring the advice) and the kernel copies nothing: the disk writes straight into the ring buffer.
Where the filesystem refuses O_DIRECT (tmpfs before Linux 6.6, some FUSE and network filesystems:
open or the first read fails with EINVAL), reads fall back to buffered `preadv` followed by
`posix_fadvise(POSIX_FADV_DONTNEED)` over the file, which drops its clean pages again (on tmpfs the
pages are the file itself and stay: such a folder is RAM anyway). `direct_io` says which is in use.
Writes are buffered, then fdatasync'd and dropped from the cache the same way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass

import torch

ALIGN = 4096
EMBEDDINGS = -1  # the store's key for the input embedding table (rows read on demand)
FORMAT = 2  # 2: sha256 checksums
MANIFEST = "manifest.json"
OWN_FILE = re.compile(r"(layer_\d+|embeddings)\.bin(\.tmp)?")  # what a rewrite removes (nothing else)
CHECK_CHUNK = 64 * 2**20


class OffloadStoreError(RuntimeError):
    """A layer file or manifest that cannot be used as it is; the message names the file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str  # relative to the layer module, e.g. "mlp.up_proj.weight"
    dtype: str  # "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class LayerEntry:
    file: str
    size: int  # bytes on disk, a multiple of ALIGN
    checksum: str  # sha256 of the whole file
    tensors: tuple[TensorEntry, ...]

    @staticmethod
    def from_json(data: dict) -> "LayerEntry":
        tensors = tuple(TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"])
                        for t in data["tensors"])
        return LayerEntry(data["file"], data["size"], data["checksum"], tensors)


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes` whose data starts on an ALIGN boundary (O_DIRECT's rule)."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    start = (-raw.data_ptr()) % ALIGN
    return raw[start:start + nbytes]


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bytes as a flat uint8 tensor (a view where `t` is contiguous)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def layout(tensors: dict[str, torch.Tensor]) -> tuple[tuple[TensorEntry, ...], int]:
    """Aligned offsets for `tensors` in name order, and the padded file size."""
    entries, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        entries.append(TensorEntry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
        offset = aligned(offset + max(nbytes, 1))
    return tuple(entries), offset


def views(buffer: torch.Tensor, entries: tuple[TensorEntry, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a layer as views into `buffer` (a layer file's bytes)."""
    out = {}
    for e in entries:
        chunk = buffer[e.offset:e.offset + e.nbytes]
        out[e.name] = chunk.view(getattr(torch, e.dtype)).view(e.shape)
    return out


def drop_cached(path: str) -> None:
    """Drop a file's clean pages from the page cache (a no-op for files other processes map)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fingerprint(tensors) -> str:
    """sha256 of the first 4096 elements of each tensor: tells apart two models of one shape, cheaply."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(tensor_bytes(t.reshape(-1)[:4096]).numpy().tobytes())
    return digest.hexdigest()


def source_identity(model_path: str, dtype: torch.dtype, n_layers: int, weights: str = "") -> dict:
    """What the folder was written from: the model directory's weight files (size, mtime), dtype,
    layer count, and a `fingerprint` of the weights (which also tells apart models not loaded from a path)."""
    files = {}
    if model_path and os.path.isdir(model_path):
        for name in sorted(os.listdir(model_path)):
            if name.endswith((".safetensors", ".bin", ".gguf")):
                st = os.stat(os.path.join(model_path, name))
                files[name] = [st.st_size, st.st_mtime_ns]
    return {"model": os.path.realpath(model_path) if model_path else "", "files": files,
            "dtype": str(dtype).removeprefix("torch."), "layers": n_layers, "weights": weights}


class OffloadStore:
    """An offload folder opened for one source; `ensure` writes layers, `read_into` reads one."""

    def __init__(self, folder: str, source: dict, layers: dict[int, LayerEntry], direct: bool = True):
        self.folder, self.source, self.layers = folder, source, layers
        self.direct_io = direct  # False once the filesystem refused O_DIRECT (or when asked)
        self.bytes_checked = 0

    # ---- opening and writing

    @classmethod
    def open(cls, folder: str, source: dict, direct: bool = True) -> "OffloadStore":
        """The folder's store for `source`: reused where the manifest matches, emptied otherwise."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, MANIFEST)
        layers = {}
        if os.path.exists(path):
            try:
                with open(path) as fh:
                    data = json.load(fh)
                if data.get("format") == FORMAT and data.get("align") == ALIGN and data.get("source") == source:
                    layers = {int(i): LayerEntry.from_json(e) for i, e in data["layers"].items()}
            except (ValueError, KeyError, TypeError) as err:
                raise OffloadStoreError(f"{path}: unreadable manifest ({err}); delete {folder} to rewrite it") from err
        store = cls(folder, source, layers, direct)
        if not layers:  # another source (or none): start over
            for name in os.listdir(folder):
                if OWN_FILE.fullmatch(name):
                    os.remove(os.path.join(folder, name))
            store._write_manifest()
        return store

    def ensure(self, tensors_of: dict[int, callable], verify: bool = True) -> list[int]:
        """Make layers present: check the listed ones already stored, write the others (returns those).

        `tensors_of[i]()` gives layer i's tensors by name (called only for layers to write).
        `verify=False` skips the checksums of stored layers (sizes are still checked on every read).
        """
        written = []
        for i in sorted(tensors_of):
            if i in self.layers:
                if verify:
                    self.verify(i)
            else:
                self._write_layer(i, tensors_of[i]())
                written.append(i)
        if written:
            self._write_manifest()
        return written

    def _write_layer(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        entries, size = layout(tensors)
        name = "embeddings.bin" if index == EMBEDDINGS else f"layer_{index:03d}.bin"
        path = os.path.join(self.folder, name)
        digest = hashlib.sha256()
        with open(path + ".tmp", "wb") as fh:
            position = 0
            for e in entries:
                pad = e.offset - position
                data = memoryview(tensor_bytes(tensors[e.name]).numpy())
                for chunk in (bytes(pad), data):
                    fh.write(chunk)
                    digest.update(chunk)
                position = e.offset + e.nbytes
            tail = bytes(size - position)
            fh.write(tail)
            digest.update(tail)
            fh.flush()
            os.fdatasync(fh.fileno())
        os.replace(path + ".tmp", path)
        drop_cached(path)
        self.layers[index] = LayerEntry(name, size, digest.hexdigest(), entries)

    def _write_manifest(self) -> None:
        data = {"format": FORMAT, "align": ALIGN, "source": self.source,
                "layers": {str(i): asdict(e) for i, e in sorted(self.layers.items())}}
        path = os.path.join(self.folder, MANIFEST)
        with open(path + ".tmp", "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(path + ".tmp", path)

    # ---- reading

    def path(self, index: int) -> str:
        return os.path.join(self.folder, self.layers[index].file)

    def _open(self, path: str) -> int:
        try:
            return os.open(path, os.O_RDONLY | (os.O_DIRECT if self.direct_io else 0))
        except OSError as err:
            if err.errno == errno.EINVAL and self.direct_io:
                raise _NoDirect from err
            raise OffloadStoreError(f"offload file {path} cannot be opened ({err.strerror}); "
                                    f"delete {self.folder} to rewrite it") from err

    def _chunks(self, index: int, buffer: torch.Tensor):
        """Read layer `index`'s file into `buffer` chunk by chunk, yielding each chunk's bytes.

        Checks the size first; falls back to buffered reads + DONTNEED where O_DIRECT is refused.
        """
        chunks = self._chunks_once(index, buffer)
        try:
            first = next(chunks)
        except _NoDirect:  # refused before any byte was read: start over, buffered
            self.direct_io = False
            chunks = self._chunks_once(index, buffer)
            first = next(chunks)
        except StopIteration:
            return
        yield first
        yield from chunks

    @contextlib.contextmanager
    def _checked(self, index: int):
        """An fd on layer `index`'s file, its size checked against the manifest; with buffered
        reads its pages are dropped from the page cache after use."""
        entry, path = self.layers[index], self.path(index)
        fd = self._open(path)
        try:
            size = os.fstat(fd).st_size
            if size != entry.size:
                raise OffloadStoreError(f"offload file {path} has {size} bytes, its manifest says {entry.size}: "
                                        f"truncated or overwritten; delete {self.folder} to rewrite it")
            yield fd
            if not self.direct_io:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def _chunks_once(self, index: int, buffer: torch.Tensor):
        size, path = self.layers[index].size, self.path(index)
        view = memoryview(buffer.numpy())
        with self._checked(index) as fd:
            done = 0
            while done < size:
                want = min(len(view), size - done)
                got = self._pread(fd, view[:want], done)
                if got < want:
                    raise OffloadStoreError(f"offload file {path} ended after {done + got} of {size} bytes: "
                                            f"truncated; delete {self.folder} to rewrite it")
                yield view[:want]
                done += want

    def _pread(self, fd: int, view: memoryview, offset: int) -> int:
        """Fill `view` from `offset` (several reads if the kernel returns less); returns bytes read."""
        done = 0
        while done < len(view):
            try:
                got = os.preadv(fd, [view[done:]], offset + done)
            except OSError as err:
                if err.errno == errno.EINVAL and self.direct_io and not done:
                    raise _NoDirect from err  # open accepted O_DIRECT, the read did not
                raise
            if got == 0:
                break
            done += got
        return done

    def read_rows(self, index: int, rows: list[int], out: torch.Tensor) -> None:
        """Read rows of the one 2-d tensor stored under `index` into `out` ([len(rows), width]).

        Each row is one read of the aligned pages that hold it (one or two pages for a 1536-wide
        bf16 table): a forward's few dozen tokens cost a few dozen small reads.
        """
        entry = self.layers[index]
        (tensor,) = entry.tensors
        row_bytes = tensor.nbytes // tensor.shape[0]
        scratch = aligned_empty(aligned(row_bytes) + ALIGN)
        flat = out.view(len(rows), -1).view(torch.uint8)
        try:
            self._rows_once(index, rows, row_bytes, scratch, flat)
        except _NoDirect:
            self.direct_io = False
            self._rows_once(index, rows, row_bytes, scratch, flat)

    def _rows_once(self, index, rows, row_bytes, scratch, flat) -> None:
        entry, path = self.layers[index], self.path(index)
        with self._checked(index) as fd:
            for k, row in enumerate(rows):
                start = entry.tensors[0].offset + row * row_bytes
                first = start - start % ALIGN
                span = aligned(start + row_bytes) - first
                if self._pread(fd, memoryview(scratch[:span].numpy()), first) < span:
                    raise OffloadStoreError(f"offload file {path} ended before row {row}: truncated; "
                                            f"delete {self.folder} to rewrite it")
                flat[k] = scratch[start - first:start - first + row_bytes]

    def read_into(self, index: int, buffer: torch.Tensor) -> int:
        """Read layer `index`'s whole file into `buffer` (aligned uint8, at least its size); returns bytes."""
        size = self.layers[index].size
        for _ in self._chunks(index, buffer[:size]):
            pass
        return size

    def verify(self, index: int) -> None:
        """Read layer `index`'s file once and compare its size and checksum with the manifest."""
        entry = self.layers[index]
        digest = hashlib.sha256()
        for chunk in self._chunks(index, aligned_empty(min(CHECK_CHUNK, entry.size))):
            digest.update(chunk)
        self.bytes_checked += entry.size
        if digest.hexdigest() != entry.checksum:
            raise OffloadStoreError(f"offload file {self.path(index)} fails its checksum (sha256 "
                                    f"{digest.hexdigest()}, manifest {entry.checksum}): corrupt; "
                                    f"delete {self.folder} to rewrite it")


class _NoDirect(Exception):
    """This filesystem refused O_DIRECT (EINVAL)."""
