"""A disk layer streamer for a CPU target larger than its RAM budget (`--offload disk`).

As many decoder layers stay resident as the `cpu=` part of `--max-memory` allows (final norm and
LM head always resident; the input embedding table stays in the folder and a forward reads only
its tokens' rows, `DiskEmbedding`, unless it is tied to the head or `embeddings_on_disk=False`:
for the default target that is 0.47 GB of a 1 GiB budget, 4 more resident layers); the rest of
the decoder layers live in the offload folder (`offload_store`: one
aligned file per layer) and are read, whole file by whole file, into a small ring of aligned
layer buffers by a background thread, up to `ring` layers ahead of the layer computing. Like the
CUDA ring of `layer_streamer`, each streamed layer in the model's ModuleList is a weightless
`StandIn`; a ring slot is one real decoder layer module whose tensors are views into that slot's
buffer, so a read overwrites the weights in place (no copy after the read) and the slot then runs
as layer i (attention `layer_idx` set to i for the KV cache).

The reader follows one endless schedule, streamed layers in order, pass after pass: it reads
position q into slot q % ring as soon as the layer computed from that slot q - ring positions
earlier has finished. So the last layers of a pass free slots for the first streamed layers of the
next pass, which are read while the verifier waits for its next tree.

Which layers stay resident: accelerate's `infer_auto_device_map` fills the budget with the first
layers; the count here is the same (whole layers while norm + head (+ embeddings) + resident
layers + the ring's buffers fit the budget) but the resident layers are the *last* ones: a pass then
ends computing resident layers while the disk already reads the next pass's first streamed layers.

Reads bypass the page cache (O_DIRECT; buffered + POSIX_FADV_DONTNEED where the filesystem refuses
O_DIRECT, see `offload_store`), so the process's memory is the budget, not the budget plus a page
cache full of "offloaded" weights, and a pass costs what the disk costs.

Exactness: streamed and resident layers are the same module types running the same kernels on
contiguous tensors of the same dtype, so the model computes bit for bit what the same model
computes in RAM. That needs plain `nn.Linear`s everywhere: oneDNN's pre-packed linears
(`launch.packed_linear`) round differently from plain ones in bf16 (a 64-row product differs in
the last bit), and a packed weight is an opaque tensor that can be neither read into nor stored.
`attach` therefore refuses a model with packed (mkldnn) tensors: load it with `pack=False`.

Start-up needs the whole model loaded once (transformers maps a same-dtype safetensors file, so
those pages are file-backed and reclaimable); resident tensors are then copied into anonymous
memory, the streamed layers dropped and the model's weight files dropped from the page cache.
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from dataclasses import dataclass

import torch

from specexec.verifier.layer_streamer import StandIn
from specexec.verifier.offload_store import (EMBEDDINGS, OffloadStore, aligned_empty, drop_cached, fingerprint,
                                             layout, source_identity, views)

RING = 2


@dataclass(frozen=True)
class DiskPlan:
    """Which decoder layers stay in RAM and which are read from disk every pass."""

    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    ring: int  # layer buffers (0 when nothing is streamed)
    fixed_bytes: int  # norm, head, rotary buffers (and the embeddings where resident)
    layer_bytes: int  # one decoder layer in RAM
    file_bytes: int  # one decoder layer's file (aligned, padded): a ring buffer's size
    budget: int

    @property
    def ram_bytes(self) -> int:
        return self.fixed_bytes + len(self.resident) * self.layer_bytes + self.ring * self.file_bytes

    @property
    def streamed_bytes(self) -> int:
        """Bytes read from disk per forward."""
        return len(self.streamed) * self.file_bytes


def plan_layers(n_layers: int, fixed_bytes: int, layer_bytes: int, file_bytes: int, budget: int,
                ring: int = RING, resident: int | None = None) -> DiskPlan:
    """The most resident layers (the last ones) whose bytes, with the ring's, fit `budget`.

    A ring slot costs at least a layer, so the plan never streams fewer layers than the ring has
    slots (keeping them resident costs no more); `resident` forces a count (tests, experiments).
    """
    for k in range(n_layers, -1, -1):
        slots = min(ring, n_layers - k)
        fits = fixed_bytes + k * layer_bytes + slots * file_bytes <= budget if resident is None else k == resident
        if fits or k == 0:
            return DiskPlan(tuple(range(n_layers - k, n_layers)), tuple(range(n_layers - k)), slots,
                            fixed_bytes, layer_bytes, file_bytes, budget)
    raise AssertionError("unreachable")


def layer_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A decoder layer's parameters and buffers by name; refuses packed (mkldnn) weights."""
    out = dict(layer.named_parameters())
    out.update((name, b) for name, b in layer.named_buffers() if b is not None)
    if any(t.is_mkldnn or t.device.type != "cpu" for t in out.values()):
        raise ValueError("disk streaming needs plain CPU tensors: load the target without packed linears "
                         "(pack=False) and without accelerate's device map")
    return out


def _nbytes(tensors) -> int:
    """Bytes of `tensors` (model.parameters() already lists a tied weight once)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class StreamStats:
    """Counters since the streamer started (subtract two snapshots for one forward)."""

    passes: int = 0  # forwards that ran the first streamed layer
    layers_read: int = 0
    bytes_read: int = 0
    read_s: float = 0.0  # time the reader spent inside reads
    wait_s: float = 0.0  # time the computation waited for a layer to arrive

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.read_s / 1e9 if self.read_s else 0.0

    def __sub__(self, other: "StreamStats") -> "StreamStats":
        return StreamStats(*(getattr(self, f) - getattr(other, f) for f in self.__dataclass_fields__))

    def describe(self) -> str:
        per = max(self.passes, 1)
        return (f"{self.passes} passes, {self.bytes_read / per / 1e9:.2f} GB read per pass at {self.gbps:.2f} GB/s, "
                f"compute waited {self.wait_s / per:.2f} s per pass")


class DiskStreamer:
    """Runs the streamed layers of `model` from `store`'s files through a ring of `plan.ring` buffers."""

    def __init__(self, model: torch.nn.Module, store: OffloadStore, plan: DiskPlan):
        self.model, self.store, self.plan = model, store, plan
        layers = getattr(model, model.base_model_prefix).layers
        self.streamed = plan.streamed
        self.position = {layer: p for p, layer in enumerate(self.streamed)}
        self.stats = StreamStats()
        self.read_log = collections.deque(maxlen=4096)  # layer indices in the order they were read
        self.cond = threading.Condition()
        self.read_count = self.consumed = 0  # positions in the endless schedule: read, computed
        self.generation, self.reading, self.stopped, self.error = 0, False, False, None
        self.slots, self.buffers = [], []
        if self.streamed:
            self._build_ring(layers)
            for i in self.streamed:
                layers[i] = StandIn(self, i, getattr(layers[i], "attention_type", None))
            self.thread = threading.Thread(target=self._reader, name="disk-streamer", daemon=True)
            self.thread.start()
        model._specexec_streamer = self

    def _build_ring(self, layers) -> None:
        entries = self.store.layers[self.streamed[0]].tensors
        if any(self.store.layers[i].tensors != entries for i in self.streamed):
            raise ValueError("disk streaming needs decoder layers of identical tensor shapes and dtypes")
        template = layers[self.streamed[0]]
        names = layer_tensors(template)
        size = max(self.store.layers[i].size for i in self.streamed)
        for _ in range(self.plan.ring):
            buffer = aligned_empty(size)
            bound = views(buffer, entries)
            memo = {id(t): (torch.nn.Parameter(bound[n], requires_grad=False)
                            if isinstance(t, torch.nn.Parameter) else bound[n]) for n, t in names.items()}
            self.buffers.append(buffer)
            self.slots.append(copy.deepcopy(template, memo))  # the template's module tree on the slot's buffer

    # ---- the reader thread

    def _reader(self) -> None:
        ring, m = self.plan.ring, len(self.streamed)
        while True:
            with self.cond:
                while not self.stopped and self.read_count - self.consumed >= ring:
                    self.cond.wait()
                if self.stopped:
                    return
                q, generation, self.reading = self.read_count, self.generation, True
            layer = self.streamed[q % m]
            start = time.perf_counter()
            try:
                nbytes = self.store.read_into(layer, self.buffers[q % ring])
            except Exception as err:  # handed to the computation, which raises it
                with self.cond:
                    self.error, self.reading = err, False
                    self.cond.notify_all()
                return
            elapsed = time.perf_counter() - start
            with self.cond:
                self.reading = False
                self.stats.read_s += elapsed
                self.stats.bytes_read += nbytes
                self.stats.layers_read += 1
                self.read_log.append(layer)
                if generation == self.generation:
                    self.read_count = q + 1
                self.cond.notify_all()

    def _resync(self, position: int) -> None:
        """Restart the schedule at `position` (a forward stopped midway, or began elsewhere). Holds cond."""
        while self.reading:
            self.cond.wait()
        m = len(self.streamed)
        base = (self.consumed // m + 1) * m + position
        self.read_count = self.consumed = base
        self.generation += 1
        self.cond.notify_all()

    # ---- the computation

    def run(self, index: int, args, kwargs):
        position = self.position[index]
        with self.cond:
            if self.consumed % len(self.streamed) != position:
                self._resync(position)
            q = self.consumed
            if position == 0:
                self.stats.passes += 1
            start = time.perf_counter()
            while self.read_count <= q and self.error is None and not self.stopped:
                self.cond.wait()
            self.stats.wait_s += time.perf_counter() - start
            if self.error is not None:
                raise self.error
            if self.read_count <= q:
                raise RuntimeError("the disk streamer was closed: this model cannot run any more")
        layer = self.slots[q % self.plan.ring]
        attention = getattr(layer, "self_attn", None)
        if attention is not None:
            attention.layer_idx = index
        try:
            return layer(*args, **kwargs)
        finally:
            with self.cond:
                self.consumed = q + 1
                self.cond.notify_all()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Until the reader has filled the ring ahead of the computation (or failed); False on timeout."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.streamed or self.error is not None or (
                not self.reading and self.read_count - self.consumed >= self.plan.ring), timeout)

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.streamed:
            self.thread.join()

    def snapshot(self) -> StreamStats:
        with self.cond:
            return copy.copy(self.stats)

    def _fixed_text(self) -> str:
        decoder = getattr(self.model, self.model.base_model_prefix)
        if isinstance(decoder.get_input_embeddings(), DiskEmbedding):
            return "norm and head resident, embedding rows read from disk as tokens need them"
        return "embeddings, norm and head resident"

    def describe(self) -> str:
        p = self.plan
        n = len(p.resident) + len(p.streamed)
        io = "O_DIRECT" if self.store.direct_io else "buffered reads + DONTNEED (no O_DIRECT here)"
        text = (f"placement (disk streamed): {len(p.resident)} of {n} decoder layers resident, "
                f"{len(p.streamed)} read from {self.store.folder} every pass ({_size(p.streamed_bytes)}, "
                f"{io}), {p.ring} layer buffers; {self._fixed_text()}; "
                f"{_size(p.ram_bytes)} in RAM for a {_size(p.budget)} budget")
        if p.ram_bytes > p.budget:
            text += " (over: what must stay resident and the ring alone do not fit)"
        stats = self.snapshot()
        return text + (f"; {stats.describe()}" if stats.passes else "")


class DiskEmbedding(torch.nn.Module):
    """The input embedding table left in the offload folder: a forward reads only its tokens' rows.

    A verification forward embeds a few dozen tokens, i.e. a few dozen rows of a table as large as
    the LM head (0.47 GB for the default target): a few small reads instead of that much RAM.
    `weight` is an empty meta tensor of the table's width and dtype (for code asking its device).
    """

    def __init__(self, store: OffloadStore, rows: int, width: int, dtype: torch.dtype):
        super().__init__()
        object.__setattr__(self, "store", store)
        self.num_embeddings, self.embedding_dim = rows, width
        self.register_buffer("weight", torch.empty(0, width, dtype=dtype, device="meta"), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        rows = torch.empty(len(unique), self.embedding_dim, dtype=self.weight.dtype)
        self.store.read_rows(EMBEDDINGS, unique.tolist(), rows)
        return rows[inverse].reshape(*ids.shape, self.embedding_dim)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def streamer_of(model: torch.nn.Module) -> "DiskStreamer | None":
    """The disk streamer `attach` gave `model`, if any."""
    streamer = getattr(model, "_specexec_streamer", None)
    return streamer if isinstance(streamer, DiskStreamer) else None


def attach(model: torch.nn.Module, folder: str, budget: int, ring: int = RING, direct: bool = True,
           resident: int | None = None, dtype: torch.dtype | None = None,
           embeddings_on_disk: bool = True, verify: bool = True) -> DiskStreamer:
    """Stream `model`'s decoder layers from `folder` so that it holds `budget` bytes of weights.

    `model` is a plain CPU model (no device map, no packed linears). Writes the folder's missing
    layer files (checking the ones already there), copies resident tensors into anonymous memory,
    replaces the streamed layers with stand-ins and drops the model's files from the page cache.
    `dtype`: the dtype to compute in, when it is not the one the model was loaded in. Loading in
    the checkpoint's own dtype maps its file instead of copying it, so converting here, a layer at
    a time, keeps the start-up's anonymous memory to the budget (e.g. a bf16 checkpoint run in float32).
    `embeddings_on_disk`: leave the input embedding table in the folder too and read the rows each
    forward needs (`DiskEmbedding`); not done where the LM head shares that table (tied weights).
    `verify=False`: reuse a matching folder without reading it through its checksums first
    (seconds of start-up; sizes are still checked on every read).
    """
    decoder = getattr(model, model.base_model_prefix)
    layers = decoder.layers
    dtype = dtype or next(model.parameters()).dtype
    table = decoder.get_input_embeddings().weight
    embeddings_on_disk = embeddings_on_disk and all(p is not table for p in model.get_output_embeddings().parameters())
    layer_ids = {id(t) for layer in layers for t in layer_tensors(layer).values()}
    skip = layer_ids | ({id(table)} if embeddings_on_disk else set())
    fixed = [_cast(t, dtype, meta=True) for t in model.parameters() if id(t) not in skip]
    fixed += [t for t in model.buffers() if id(t) not in layer_ids]
    shapes = _converted(layers[0], dtype, meta=True)
    plan = plan_layers(len(layers), _nbytes(fixed), _nbytes(shapes.values()), layout(shapes)[1], budget, ring,
                       resident)
    path = getattr(model, "name_or_path", "") or ""
    weights = fingerprint([table] + [t for layer in layers for _, t in sorted(layer_tensors(layer).items())])
    store = OffloadStore.open(folder, source_identity(path, dtype, len(layers), weights), direct)
    wanted = {i: (lambda i=i: _converted(layers[i], dtype)) for i in plan.streamed}
    if embeddings_on_disk:
        wanted[EMBEDDINGS] = lambda: {"weight": _cast(table.detach(), dtype)}
    store.ensure(wanted, verify)
    if embeddings_on_disk:
        decoder.set_input_embeddings(DiskEmbedding(store, table.shape[0], table.shape[1], dtype))
    streamer = DiskStreamer(model, store, plan)  # the streamed layers' tensors are dropped here
    _own_resident(model, dtype)
    for file in store.source["files"]:
        drop_cached(f"{path}/{file}")
    return streamer


def _cast(t: torch.Tensor, dtype: torch.dtype, meta: bool = False) -> torch.Tensor:
    """A parameter in the compute dtype (a shape-only stand-in when `meta`)."""
    dtype = dtype if t.is_floating_point() else t.dtype
    return torch.empty(t.shape, dtype=dtype, device="meta") if meta else t.to(dtype)


def _converted(layer: torch.nn.Module, dtype: torch.dtype, meta: bool = False) -> dict[str, torch.Tensor]:
    """A layer's tensors as they are stored: parameters in `dtype`, buffers as they are."""
    params = dict(layer.named_parameters())
    return {n: _cast(t, dtype, meta) if n in params else t for n, t in layer_tensors(layer).items()}


def _own_resident(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Copy the model's (resident) tensors into anonymous memory, parameters in `dtype`: they may
    be views of a mapped weight file."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype if p.is_floating_point() else p.dtype, copy=True)
        for module in model.modules():
            for name, b in list(module._buffers.items()):
                if b is not None and b.device.type != "meta":
                    module._buffers[name] = b.clone()
