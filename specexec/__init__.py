"""specexec: SpecExec speculative decoding, a drafter and a verifier in two processes.

The subpackages live at the repository's top level (the design card's layout) and are
installed under this namespace by setuptools' package-dir mapping:
`specexec.protocol`, `specexec.drafter`, `specexec.verifier`, `specexec.launch`.

The Python API: `specexec.load(...)` (see `specexec.launch.api`), imported on first use so
that `import specexec` stays light (no torch).
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("specexec")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["load", "LLM", "Completion", "__version__"]


def __getattr__(name: str):
    if name in ("load", "LLM", "Completion"):
        from specexec.launch import api
        return getattr(api, name)
    raise AttributeError(f"module 'specexec' has no attribute {name!r}")
