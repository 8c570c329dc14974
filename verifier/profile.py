"""The target's forward cost against the number of tokens: the curve `--budget auto` builds on.

Each size n is timed as a real verification forward: a tree of n nodes on top of a cached
prefix, with the tree mask, exactly what a round with budget n-1 costs.

For a disk-streamed target, `disk_limit` adds what the disk allows: the bytes read per pass and
the offload folder's sequential read bandwidth with the page cache bypassed, whose quotient is
the least a forward can take.
"""

from __future__ import annotations

import errno
import os
import statistics
import time
from dataclasses import dataclass

from specexec.protocol.tree import DraftTree
from specexec.verifier.disk_streamer import DiskStreamer
from specexec.verifier.offload_store import ALIGN, aligned_empty
from specexec.verifier.target_model import TargetModel

SIZES = (1, 4, 16, 64, 256, 1024)


def chain(n: int, vocab: int) -> DraftTree:
    return DraftTree.build([(1000 + i) % vocab for i in range(n)], list(range(-1, n - 1)))


def forward_curve(target: TargetModel, sizes=SIZES, prefix: int = 256, trials: int = 2) -> dict[int, float]:
    """Seconds per verification forward over n tokens (1 appended + n-1 tree nodes)."""
    curve, vocab = {}, target.vocab_size
    cache = target.new_cache()
    target.forward(cache, [(100 + i) % vocab for i in range(prefix)], DraftTree.empty())
    target.forward(cache, [7], chain(3, vocab))  # first forwards of a shape are slow: keep one out
    target.commit(cache, 3, [])
    for n in sizes:
        times = []
        for _ in range(trials):
            t = time.perf_counter()
            target.forward(cache, [7], chain(n - 1, vocab))
            times.append(time.perf_counter() - t)
            target.commit(cache, n - 1, [])
            target.truncate(cache, prefix + 1)
        curve[n] = statistics.median(times)
    return curve


@dataclass(frozen=True)
class DiskLimit:
    """What the disk allows a disk-streamed target: its bytes per pass over the disk's bandwidth."""

    bytes_per_pass: int  # the non-resident layers' files, read once per forward
    gbps: float  # sequential read bandwidth measured on the offload folder, page cache bypassed
    direct_io: bool  # measured with O_DIRECT (else buffered reads after DONTNEED)

    @property
    def limit_s(self) -> float:
        """The least a forward can take while every non-resident byte comes from the disk."""
        return self.bytes_per_pass / (self.gbps * 1e9) if self.gbps else float("inf")

    def describe(self) -> str:
        how = "O_DIRECT" if self.direct_io else "buffered after DONTNEED"
        return (f"disk: {self.bytes_per_pass / 1e9:.2f} GB read per pass, {self.gbps:.2f} GB/s sequential "
                f"({how}): a forward takes at least {self.limit_s:.2f} s")


def read_bandwidth(paths: list[str], chunk: int = 64 * 2**20) -> tuple[float, bool]:
    """GB/s reading `paths` once, sequentially, in `chunk`-byte reads that bypass the page cache.

    O_DIRECT where the filesystem allows it; elsewhere each file's cached pages are dropped
    (POSIX_FADV_DONTNEED) before and after it is read. Returns (GB/s, whether O_DIRECT was used).
    """
    buffer = memoryview(aligned_empty(chunk).numpy())
    total, direct, start = 0, True, time.perf_counter()
    for path in paths:
        fd, direct = _open_uncached(path, direct)
        try:
            offset, got = 0, len(buffer)
            while got == len(buffer):  # a short read is the end of the file
                got = os.preadv(fd, [buffer], offset)
                offset += got
            total += offset
            if not direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - start
    return (total / elapsed / 1e9 if elapsed else 0.0), direct


def _open_uncached(path: str, direct: bool) -> tuple[int, bool]:
    """A descriptor reading `path` past the page cache, and whether that is O_DIRECT."""
    if direct:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT) if _direct_opens(path) else None
        if fd is not None:
            try:
                os.preadv(fd, [memoryview(aligned_empty(ALIGN).numpy())], 0)  # some filesystems refuse here
                return fd, True
            except OSError as err:
                os.close(fd)
                if err.errno != errno.EINVAL:
                    raise
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd, False


def _direct_opens(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        return False


def disk_limit(streamer: DiskStreamer) -> DiskLimit:
    """Measure the offload folder's bandwidth the way the streamer reads it: each streamed layer's
    file once, whole, into an aligned buffer (O_DIRECT where the filesystem allows).

    Waits for the streamer's reader to fill its ring first, so the two do not share the disk.
    """
    streamer.wait_idle()
    store, streamed = streamer.store, streamer.plan.streamed
    if not streamed:
        return DiskLimit(0, 0.0, store.direct_io)
    buffer = aligned_empty(max(store.layers[i].size for i in streamed))
    start = time.perf_counter()
    total = sum(store.read_into(i, buffer) for i in streamed)
    return DiskLimit(streamer.plan.streamed_bytes, total / (time.perf_counter() - start) / 1e9, store.direct_io)


def against_limit(curve: dict[int, float], limit: DiskLimit) -> str:
    """The forward-time curve as multiples of the disk's limit (1.00x: the forward costs its reads)."""
    return ", ".join(f"{n}: {t:.2f} s = {t / limit.limit_s:.2f}x" for n, t in sorted(curve.items()))
