"""Where the target's weights live: one device, accelerate's offloading, or the layer streamer.

  --device cpu|cuda|cuda:N|auto   where it computes (auto: accelerate spreads it)
  --max-memory cuda:0=20GiB,cpu=64GiB   accelerate's `max_memory`: what spills goes to the next
                                  device, and past the last one to --offload-folder on disk
  --offload stream                decoder layers in (pinned) CPU memory, streamed to the device
                                  one ahead of the computation (verifier.layer_streamer)
  --offload disk                  a CPU target over its `cpu=` budget: the layers that do not fit
                                  are read from --offload-folder every pass, ahead of the
                                  computation, bypassing the page cache (verifier.disk_streamer).
                                  The default when --max-memory and --offload-folder put layers
                                  on disk for a CPU target (`none` resolves to it)
  --offload accelerate            accelerate's own disk offload (hooks reading each weight as
                                  its module runs), kept for comparison
"""

from __future__ import annotations

import re
import resource
from collections import Counter
from dataclasses import dataclass

import torch

MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)


def parse_max_memory(text: str) -> dict:
    """`cuda:0=20GiB,cpu=64GiB` -> {0: '20GiB', 'cpu': '64GiB'} (accelerate's form); errors name the part."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"--max-memory part {part!r} is not DEVICE=SIZE (e.g. cuda:0=20GiB,cpu=64GiB)")
        device, size = (s.strip() for s in part.split("=", 1))
        if not MEMORY.match(size):
            raise ValueError(f"--max-memory size {size!r} for {device} is not a size like 20GiB or 512MB")
        if device in ("cpu", "disk", "mps"):
            key = device
        elif re.fullmatch(r"(cuda:)?\d+", device):
            key = int(device.split(":")[-1])
        elif device == "cuda":
            key = 0
        else:
            raise ValueError(f"--max-memory device {device!r} is not cpu, cuda or cuda:N")
        number, unit = MEMORY.match(size).groups()
        out[key] = int(float(number)) if unit.upper() == "B" else size.replace(" ", "")  # accelerate's forms
    if not out:
        raise ValueError("--max-memory is empty")
    return out


OFFLOADS = ("none", "stream", "disk", "accelerate")


@dataclass(frozen=True)
class Placement:
    device: str = "cpu"
    max_memory: str | None = None  # the CLI text; parsed by parse_max_memory
    offload_folder: str | None = None
    offload: str = "none"  # one of OFFLOADS

    def __post_init__(self):
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device):
            raise ValueError(f"--device {self.device!r}: expected cpu, cuda, cuda:N or auto")
        if self.offload not in OFFLOADS:
            raise ValueError(f"--offload {self.offload!r}: expected {', '.join(OFFLOADS[:-1])} or {OFFLOADS[-1]}")
        if self.max_memory:
            parse_max_memory(self.max_memory)
        if self.offload == "stream" and (self.max_memory or self.device == "auto"):
            raise ValueError("--offload stream places layers itself: drop --max-memory / --device auto")
        if self.offload == "disk":
            if not (self.max_memory and self.offload_folder):
                raise ValueError("--offload disk needs --max-memory cpu=SIZE and --offload-folder DIR")
            if "cpu" not in parse_max_memory(self.max_memory):
                raise ValueError("--offload disk needs a cpu budget in --max-memory (e.g. cpu=1GiB)")
            if self.compute_device != "cpu":
                raise ValueError("--offload disk streams to a CPU target: use --device cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA device is available here")

    @property
    def compute_device(self) -> str:
        if self.device == "auto":
            return "cuda:0" if torch.cuda.is_available() else "cpu"
        return "cuda:0" if self.device == "cuda" else self.device

    @property
    def mode(self) -> str:
        """none | stream | disk | accelerate: `none` becomes `disk` where layers go to disk on a CPU target."""
        if self.offload != "none":
            return self.offload
        on_disk = bool(self.max_memory and self.offload_folder) and self.compute_device == "cpu"
        if on_disk and "cpu" in parse_max_memory(self.max_memory):
            return "disk"
        return "accelerate" if self.device == "auto" or self.max_memory else "none"

    @property
    def uses_accelerate(self) -> bool:
        return self.mode == "accelerate"

    @property
    def cpu_budget(self) -> int:
        """Bytes of the `cpu=` part of --max-memory (disk streaming's budget)."""
        from accelerate.utils import convert_file_size_to_int
        return convert_file_size_to_int(parse_max_memory(self.max_memory)["cpu"])

    def load_kwargs(self) -> dict:
        """Keyword arguments for `from_pretrained` (empty: load on the CPU as usual)."""
        if self.uses_accelerate:
            kwargs = {"device_map": "auto"}
            if self.max_memory:
                kwargs["max_memory"] = parse_max_memory(self.max_memory)
            if self.offload_folder:
                kwargs["offload_folder"] = self.offload_folder
            return kwargs
        if self.compute_device != "cpu" and self.mode == "none":
            return {"device_map": {"": self.compute_device}}
        return {}

    def describe(self) -> str:
        parts = [f"device {self.device}"]
        if self.max_memory:
            parts.append(f"max memory {self.max_memory}")
        if self.offload_folder:
            parts.append(f"offload folder {self.offload_folder}")
        if self.mode in ("stream", "disk"):
            parts.append("layers streamed" + (" from disk" if self.mode == "disk" else ""))
        if self.offload == "accelerate":  # (the profile cache keys on this text)
            parts.append("accelerate's offload")
        return ", ".join(parts)


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _label(device) -> str:
    device = str(device)
    return f"cuda:{device}" if device.isdigit() else device


def _device_of(name: str, device_map: dict) -> str:
    """Where accelerate put module `name`: its own entry, its closest ancestor's, or its children's."""
    owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    if owners:
        return _label(device_map[max(owners, key=len)])
    children = {_label(d) for k, d in device_map.items() if k.startswith(name + ".")}
    return "+".join(sorted(children)) or "?"


def report(model: torch.nn.Module) -> str:
    """Layers per device (or disk) and bytes per device, as placed."""
    device_map = getattr(model, "hf_device_map", None)
    layers = getattr(getattr(model, model.base_model_prefix), "layers", [])
    streamer = getattr(model, "_specexec_streamer", None)
    if streamer is not None:
        return streamer.describe()
    if device_map:
        prefix = model.base_model_prefix
        per_layer = Counter(_device_of(f"{prefix}.layers.{i}", device_map) for i in range(len(layers)))
        by_device = Counter()
        for name, module in model.named_modules():
            if name in device_map:
                by_device[_label(device_map[name])] += _bytes(module)
        layer_text = ", ".join(f"{n} on {d}" for d, n in sorted(per_layer.items()))
        byte_text = ", ".join(f"{d} {b / 2**30:.2f} GiB" for d, b in sorted(by_device.items()))
        return f"placement (accelerate): decoder layers {layer_text}; bytes {byte_text}"
    devices = Counter(str(p.device) for p in model.parameters())
    device = devices.most_common(1)[0][0] if devices else "cpu"
    return f"placement: all {len(layers)} decoder layers on {device}; {_bytes(model) / 2**30:.2f} GiB"


def streams_weights(model: torch.nn.Module) -> bool:
    """Whether every forward moves weights into the computing device (the offloaded regime, where a
    pass costs about the same for 1 or 128 tokens): a layer streamer, or accelerate with modules on
    disk, or in CPU memory under a GPU."""
    if getattr(model, "_specexec_streamer", None) is not None:
        return True
    labels = {_label(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    return "disk" in labels or ("cpu" in labels and any(label.startswith("cuda") for label in labels))


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> dict:
    """Current resident memory split as the kernel reports it (anonymous vs file-backed pages)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out
