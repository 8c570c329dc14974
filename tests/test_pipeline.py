"""The one in-process join, the Pipeline interface both pipelines implement, and the rule that
each process imports only its own side."""

import json
import subprocess
import sys

import pytest

from specexec.drafter.session import RunOptions
from specexec.drafter.tree_config import TreeConfig
from specexec.launch.drafting import RemotePipeline
from specexec.launch.options import ModelOptions
from specexec.launch.pipeline import LocalPipeline, Pipeline
from specexec.protocol.sampling import SamplingParams
from tiny_models import save_tiny_pair

IMPORTS = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("specexec."))))
"""


def loaded_by(module: str) -> list[str]:
    """specexec modules a fresh interpreter holds after importing `module`."""
    out = subprocess.run([sys.executable, "-c", IMPORTS, module], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_the_verifier_process_never_imports_the_drafter():
    modules = loaded_by("specexec.launch.serving")
    assert "specexec.verifier.server" in modules  # the check sees what was imported
    assert not [m for m in modules if m.startswith("specexec.drafter")]


def test_the_drafter_process_never_imports_the_verifier():
    modules = loaded_by("specexec.launch.drafting")
    assert "specexec.drafter.session" in modules
    assert not [m for m in modules if m.startswith("specexec.verifier")]


def test_only_the_pipeline_joins_both_sides():
    modules = loaded_by("specexec.launch.pipeline")
    assert any(m.startswith("specexec.drafter") for m in modules)
    assert any(m.startswith("specexec.verifier") for m in modules)


def test_the_command_line_loads_no_model_code_until_a_command_runs():
    modules = loaded_by("specexec.launch.cli")
    heavy = [m for m in modules if m.startswith("specexec.verifier") or
             (m.startswith("specexec.drafter.") and m != "specexec.drafter.tree_config")]
    assert not heavy


def test_both_pipelines_implement_the_interface(tmp_path):
    paths = save_tiny_pair(tmp_path)[0]
    local = LocalPipeline(paths["target"], paths["draft"], ModelOptions(dtype="float32"))
    assert isinstance(local, Pipeline)
    for name in ("encode", "encode_chat", "generate", "close"):
        assert callable(getattr(RemotePipeline, name))
    prompt = local.encode("w10 w11 w12", chat=False)
    result = local.generate(prompt, RunOptions(TreeConfig("specexec", 8), SamplingParams(), 6))
    assert len(result.token_ids) == 6
