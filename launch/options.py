"""The option groups the command line (and the Python API) build once and pass whole.

Plain frozen dataclasses with no model code behind them, so that either process can hold
them: the drafter's process passes `PlacementOptions` on to a verifier it starts, and the
verifier's process turns it into a `verifier.placement.Placement` where it loads the target.
The tree and sampling groups are the drafter's `TreeConfig` and the protocol's
`SamplingParams`, gathered with the run length in `drafter.session.RunOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BIND = "tcp://127.0.0.1:5555"
READY_LINE = "specexec verifier listening on"  # `specexec serve` prints it, then the address


@dataclass(frozen=True)
class ModelOptions:
    """Which models, in which number format (None: the default pair's)."""

    draft: str | None = None
    target: str | None = None
    dtype: str = "auto"
    draft_dtype: str = "auto"


@dataclass(frozen=True)
class PlacementOptions:
    """Where the target's weights live, as the user wrote it (checked by the verifier)."""

    device: str = "cpu"
    max_memory: str | None = None
    offload_folder: str | None = None
    offload: str = "none"

    @property
    def is_default(self) -> bool:
        return self == PlacementOptions()

    @property
    def offloaded(self) -> bool:
        """Weights stream into the computing device every pass (from RAM or from disk)."""
        return self.offload != "none" or bool(self.max_memory) or self.device == "auto"

    @property
    def computes_elsewhere(self) -> bool:
        """The target computes on hardware the drafter does not use (a GPU)."""
        return self.device.startswith("cuda")

    def args(self) -> tuple[str, ...]:
        """The same placement as `specexec serve` options."""
        out = ("--device", self.device, "--offload", self.offload)
        if self.max_memory:
            out += ("--max-memory", self.max_memory)
        if self.offload_folder:
            out += ("--offload-folder", self.offload_folder)
        return out


@dataclass(frozen=True)
class LinkOptions:
    """How the drafter reaches its verifier."""

    connect: str | None = None  # a running `specexec serve`; None: start one here
    in_process: bool = False  # the target in the drafter's own process
    overlap: bool | None = None  # None: decided by `drafting.resolve_overlap`
    key_file: str | None = None
    curve_dir: str | None = None
    timeout_s: float = 60.0
    threads: int | None = None  # torch threads for the drafter (and a verifier started here)
