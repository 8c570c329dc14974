"""A memory cgroup for a verifier process started here: the offloaded regime measured honestly.

An offloaded target must live in a memory budget that counts the page cache too, or the
kernel quietly keeps the "offloaded" weights in RAM and the disk never shows. A `MemoryCap`
is a cgroup (v1 `memory` + `blkio`, or v2 `memory` + `io`) with a memory limit and, where
asked, a read throttle on the disks holding the model; the verifier process is moved into it
right after it starts, and its peak memory is read back per run. Files can be dropped from
the page cache first (`posix_fadvise(DONTNEED)`), so that nothing read earlier by another
process hides the reads. Needs root and a cgroup memory controller: `MemoryCap.create` raises
`CapUnavailable` saying which is missing.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


class CapUnavailable(RuntimeError):
    """This machine (or user) cannot make the cgroup; the message says why."""


def parse_size(text: str) -> int:
    """`1800M`, `2GiB`, `512MB`, `1073741824` -> bytes (K/M/G/T are powers of 1024)."""
    match = SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size like 1800M or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(number * 1024 ** power)


@dataclass(frozen=True)
class CapOptions:
    memory: str  # e.g. 1800M
    read_bps: int | None = None  # throttle reads from the disks holding `paths`
    paths: tuple[str, ...] = ()  # files or folders the verifier reads its weights from
    uncache: bool = True  # drop `paths` from the page cache before the verifier starts


def drop_from_page_cache(path: str) -> int:
    """Ask the kernel to forget the cached pages of every file under `path`; returns the count."""
    files = [Path(path)] if Path(path).is_file() else [p for p in Path(path).rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return len(files)


def _devices(paths) -> list[str]:
    out = set()
    for p in paths:
        st = os.stat(p)
        out.add(f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    return sorted(out)


class MemoryCap:
    """One cgroup holding a verifier: limit, throttle, membership and peak memory."""

    def __init__(self, dirs: dict[str, Path], version: int):
        self.dirs, self.version = dirs, version

    @classmethod
    def create(cls, options: CapOptions) -> "MemoryCap":
        limit = parse_size(options.memory)
        name = f"specexec-{uuid.uuid4().hex[:8]}"
        cap = cls._make_v1(name) if (ROOT / "memory").is_dir() else cls._make_v2(name)
        try:
            cap._limit(limit, options.read_bps, _devices(options.paths) if options.read_bps else [])
        except OSError as err:
            cap.close()
            raise CapUnavailable(f"cannot set the cgroup's limits ({err}); run as root") from err
        if options.uncache:
            for path in options.paths:
                drop_from_page_cache(path)
        return cap

    @classmethod
    def _make_v1(cls, name: str) -> "MemoryCap":
        own = next((line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if line.split(":")[1] == "memory"), "/")
        dirs = {"memory": ROOT / "memory" / own.lstrip("/") / name}
        if (ROOT / "blkio").is_dir():
            dirs["blkio"] = ROOT / "blkio" / name
        return cls._mkdirs(dirs, 1)

    @classmethod
    def _make_v2(cls, name: str) -> "MemoryCap":
        controllers = ROOT / "cgroup.controllers"
        if not controllers.is_file() or "memory" not in controllers.read_text().split():
            raise CapUnavailable("no cgroup memory controller on this machine (neither v1 memory nor v2)")
        own = next(line[3:].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.startswith("0::"))
        return cls._mkdirs({"unified": ROOT / own.lstrip("/") / name}, 2)

    @classmethod
    def _mkdirs(cls, dirs: dict[str, Path], version: int) -> "MemoryCap":
        made = {}
        for key, path in dirs.items():
            try:
                path.mkdir()
            except OSError as err:
                for p in made.values():
                    p.rmdir()
                raise CapUnavailable(f"cannot create the cgroup {path} ({err.strerror}): "
                                     "needs root and a writable cgroup hierarchy") from err
            made[key] = path
        return cls(made, version)

    def _limit(self, limit: int, read_bps: int | None, devices: list[str]) -> None:
        if self.version == 1:
            (self.dirs["memory"] / "memory.limit_in_bytes").write_text(str(limit))
            for dev in devices if "blkio" in self.dirs else []:
                (self.dirs["blkio"] / "blkio.throttle.read_bps_device").write_text(f"{dev} {read_bps}")
        else:
            (self.dirs["unified"] / "memory.max").write_text(str(limit))
            for dev in devices:
                (self.dirs["unified"] / "io.max").write_text(f"{dev} rbps={read_bps}")

    def add(self, pid: int) -> None:
        for path in self.dirs.values():
            (path / "cgroup.procs").write_text(str(pid))

    def peak_bytes(self) -> int:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        path = self.dirs["memory" if self.version == 1 else "unified"] / name
        try:
            return int(path.read_text())
        except (OSError, ValueError):
            return 0

    def reset_peak(self) -> None:
        """Start a new peak (per benchmark run); kernels without a resettable peak keep the old one."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            (self.dirs["memory" if self.version == 1 else "unified"] / name).write_text("0")
        except OSError:
            pass

    def close(self) -> None:
        for path in self.dirs.values():
            try:
                path.rmdir()
            except OSError:
                pass  # still holds a process that is exiting; the kernel frees it with the last one
