"""The verifier's process (`specexec serve`): load the target, host sessions until interrupted.

Imports the verifier's side and the shared loading code, never the drafter's.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

import torch

from specexec.launch.loading import load_causal_lm, load_tokenizer, resolve_dtype, stop_ids, stored_dtype
from specexec.launch.options import DEFAULT_BIND, READY_LINE, PlacementOptions
from specexec.launch.profile_cache import cached_curve, format_curve, profile_key
from specexec.protocol.codec import Limits
from specexec.protocol.fingerprint import tokenizer_fingerprint
from specexec.verifier.connection_cap import MAX_CONNECTIONS
from specexec.verifier.disk_streamer import StreamStats, attach, streamer_of
from specexec.verifier.layer_streamer import LayerStreamer
from specexec.verifier.placement import Placement, report as placement_report
from specexec.verifier.profile import DiskLimit, against_limit, disk_limit, forward_curve
from specexec.verifier.server import ServerConfig, VerifierServer, VerifierService
from specexec.verifier.session import prefill_chunk
from specexec.verifier.target_model import TargetModel

AUTO_SIZES = (1, 4, 16, 32, 64, 128, 256)  # forward sizes the budget tuner interpolates between


@dataclass(frozen=True)
class ServeOptions:
    target_path: str
    bind: str = DEFAULT_BIND
    dtype: str = "auto"
    key: bytes | None = None
    curve_dir: str | None = None
    insecure: bool = False
    threads: int | None = None
    max_sessions: int = 16
    max_cached_tokens: int = 1 << 18
    idle_timeout_s: float = 600.0
    max_connections: int = MAX_CONNECTIONS
    max_tree_nodes: int = 4096
    exit_with_parent: bool = False
    profile: bool = False  # measure the forward-cost curve at start-up (for drafters' --budget auto)
    simulate_bus_gbps: float | None = None
    placement: PlacementOptions = PlacementOptions()


def make_placement(options: PlacementOptions) -> Placement:
    """The verifier's placement; ValueError names a bad option."""
    return Placement(options.device, options.max_memory, options.offload_folder, options.offload)


def load_target(path: str, dtype: str, placement: Placement) -> torch.nn.Module:
    """The target, placed: in RAM or on one device, spread by accelerate, streamed from RAM to a
    GPU, or streamed from disk (`--max-memory cpu=... --offload-folder`).

    Its linears are never pre-packed (`launch.packed_linear`): oneDNN's packed bf16 products
    round differently from plain ones for batches of tree size, and a streamed layer cannot be
    packed, so a packed in-RAM target and a streamed one would part ways at near-ties. Plain
    kernels everywhere make every placement compute the same logits, bit for bit
    (tests/test_disk_streamer.py).
    """
    compute = resolve_dtype(dtype, path, placement.compute_device)
    if placement.mode == "disk":  # load as stored (a mapped file, not a copy), convert layer by layer
        model = load_causal_lm(path, stored_dtype(path) or compute, pack=False)
        attach(model, placement.offload_folder, placement.cpu_budget, dtype=compute)
        return model
    model = load_causal_lm(path, compute, pack=False, **placement.load_kwargs())
    if placement.mode == "stream":
        LayerStreamer(model, placement.compute_device)
    return model


def target_curve(target: TargetModel, path: str, placement: str = "cpu", sizes=AUTO_SIZES) -> dict[int, float]:
    """The target's forward cost per size, measured once per (model, dtype, placement, threads)."""
    key = profile_key(path, target.dtype, placement, sizes=list(sizes), bus=target.simulate_bus_gbps)
    return cached_curve("target", key, lambda: forward_curve(target, sizes))


def is_loopback(address: str) -> bool:
    """True for ipc/inproc addresses and tcp on a loopback host."""
    scheme = address.split("://", 1)[0]
    if scheme in ("ipc", "inproc"):
        return True
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or '*': reachable from elsewhere


def check_exposure(options: ServeOptions) -> None:
    """A verifier reachable from the network must authenticate its peers."""
    if is_loopback(options.bind) or options.key or options.insecure:
        return
    raise ValueError(f"refusing to bind {options.bind} without a key: anyone who can reach it could use the "
                     "target and read what it generates. Pass --key-file (and --curve-dir to encrypt), or "
                     "--insecure if this network is trusted")


def build_service(options: ServeOptions) -> VerifierService:
    placement = make_placement(options.placement)
    tokenizer = load_tokenizer(options.target_path)
    model = load_target(options.target_path, options.dtype, placement)
    target = TargetModel(model, options.simulate_bus_gbps)
    print(placement_report(model), file=sys.stderr, flush=True)
    config = ServerConfig(bind=options.bind, key=options.key, curve_dir=options.curve_dir,
                          limits=Limits(max_tree_nodes=options.max_tree_nodes),
                          max_sessions=options.max_sessions, max_cached_tokens=options.max_cached_tokens,
                          idle_timeout_s=options.idle_timeout_s, max_connections=options.max_connections,
                          max_context=min(target.max_context, 2**40),
                          prefill_chunk=prefill_chunk(target.offloaded))
    service = VerifierService(target, tokenizer_fingerprint(tokenizer), stop_ids(tokenizer, model), config,
                              model_name=str(getattr(model.config, "name_or_path", options.target_path)),
                              chat_template=getattr(tokenizer, "chat_template", None) or "")
    if options.profile:
        service.forward_curve = target_curve(target, options.target_path, placement.describe())
        print(format_curve(service.forward_curve, "target forward cost"
                           + (" (simulated bus)" if options.simulate_bus_gbps else "")), file=sys.stderr)
    return service


def serve(options: ServeOptions) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    check_exposure(options)
    if options.threads:
        torch.set_num_threads(options.threads)
    service = build_service(options)
    server = VerifierServer(service)
    parent = os.getppid()
    print(f"{READY_LINE} {server.address}", flush=True)
    logging.getLogger("specexec.verifier").info(
        "target %s, %d threads, HMAC %s, CURVE %s%s", service.model_name, torch.get_num_threads(),
        "on" if options.key else "off", "on" if options.curve_dir else "off",
        f", simulated bus {options.simulate_bus_gbps} GB/s" if options.simulate_bus_gbps else "")
    try:
        server.serve(should_stop=(lambda: os.getppid() != parent) if options.exit_with_parent else (lambda: False))
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


@dataclass(frozen=True)
class ProfileOptions:
    target_path: str
    dtype: str = "auto"
    sizes: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)
    prefix: int = 256
    threads: int | None = None
    simulate_bus_gbps: float | None = None
    placement: PlacementOptions = PlacementOptions()


@dataclass
class ProfileResult:
    placement_text: str
    title: str
    curve: dict[int, float]
    limit: DiskLimit | None = None  # a disk-streamed target: what its disk allows per forward
    reads: StreamStats | None = None  # what the curve's forwards read from disk

    def describe_limit(self) -> str:
        if self.limit is None:
            return ""
        per_pass = self.reads.bytes_read / max(self.reads.passes, 1) if self.reads else 0
        return (f"{self.limit.describe()}\n"
                f"read while profiling: {per_pass / 1e9:.2f} GB per forward at {self.reads.gbps:.2f} GB/s\n"
                f"forward time against that limit: {against_limit(self.curve, self.limit)}")


def profile(options: ProfileOptions) -> ProfileResult:
    """`specexec profile`: the target's forward time against the number of tokens, as placed."""
    if options.threads:
        torch.set_num_threads(options.threads)
    placement = make_placement(options.placement)
    model = load_target(options.target_path, options.dtype, placement)
    streamer = streamer_of(model)
    limit = disk_limit(streamer) if streamer else None  # measured first, on an idle disk
    before = streamer.snapshot() if streamer else None
    curve = forward_curve(TargetModel(model, options.simulate_bus_gbps), options.sizes, options.prefix)
    reads = streamer.snapshot() - before if streamer else None
    title = f"target forward cost ({placement.describe()}{', simulated bus' if options.simulate_bus_gbps else ''})"
    return ProfileResult(placement_report(model), title, curve, limit, reads)


def target_for_timing(path: str, dtype: str) -> TargetModel:
    """The target on this CPU, for timing a forward beside something else (`bench-wire`)."""
    return TargetModel(load_causal_lm(path, resolve_dtype(dtype, path), pack=False))
