"""Measured forward-cost curves, cached per (model, dtype, placement, threads) in SPECEXEC_HOME."""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Callable

import torch

from specexec.launch import model_store


def _path(kind: str, key: dict):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return model_store.home() / "profiles" / f"{kind}-{digest}.json"


def profile_key(model_path: str, dtype, placement: str, **extra) -> dict:
    return {"model": str(model_path), "dtype": str(dtype), "placement": placement,
            "threads": torch.get_num_threads(), "torch": torch.__version__, **extra}


def cached_curve(kind: str, key: dict, measure: Callable[[], dict[int, float]], refresh: bool = False,
                 log=lambda msg: print(msg, file=sys.stderr)) -> dict[int, float]:
    path = _path(kind, key)
    if path.is_file() and not refresh:
        try:
            return {int(n): float(s) for n, s in json.loads(path.read_text())["curve"].items()}
        except (ValueError, KeyError, json.JSONDecodeError):
            pass  # unreadable: measure again
    log(f"profiling the {kind} forward cost (cached in {path.parent} for next time)...")
    curve = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "curve": {str(n): s for n, s in curve.items()}}, indent=1))
    return curve


def format_curve(curve: dict[int, float], title: str) -> str:
    rows = [title, " tokens | ms per forward | vs 1 token"]
    base = curve[min(curve)]
    rows += [f" {n:6d} | {s * 1e3:13.1f} | {s / base:9.2f}x" for n, s in sorted(curve.items())]
    return "\n".join(rows)
