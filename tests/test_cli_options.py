"""The CLI's small options: --system, -v/-q, SPECEXEC_* environment variables, models prune/rm."""

import json

import pytest
from click.testing import CliRunner

from specexec.launch import model_store
from specexec.launch.cli import main
from tiny_models import save_tiny_pair


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


def run(paths, *args, env=None):
    res = CliRunner().invoke(main, [*args[:1], "--target", paths["target"], "--draft", paths["draft"],
                                    "--in-process", "--dtype", "float32", *args[1:]], env=env)
    return res


def test_system_message_goes_first(tiny_pair):
    paths, _ = tiny_pair
    res = run(paths, "generate", "w9", "--json", "--max-new-tokens", "2", "--system", "w7")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["prompt_tokens"] == 5  # "<system> w7 <user> w9 <assistant>"
    res = run(paths, "generate", "w9", "--raw", "--system", "w7")
    assert res.exit_code == 2 and "--system" in res.output


def test_environment_sets_options(tiny_pair):
    paths, _ = tiny_pair
    res = run(paths, "generate", "w9", "--json", env={"SPECEXEC_GENERATE_MAX_NEW_TOKENS": "1"})
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["token_ids"]) == 1
    res = run(paths, "generate", "w9", "--json", "--max-new-tokens", "2", env={"SPECEXEC_GENERATE_MAX_NEW_TOKENS": "1"})
    assert len(json.loads(res.stdout)["token_ids"]) == 2  # the command line wins


def test_verbosity_flags_set_the_log_level():
    import logging
    root = logging.getLogger()
    before = root.level
    try:
        for flags, level in ((["-q"], logging.ERROR), (["-v"], logging.INFO), (["-vv"], logging.DEBUG)):
            assert CliRunner().invoke(main, [*flags, "models", "list"]).exit_code == 0
            assert root.level == level
    finally:
        root.setLevel(before)


def test_version():
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and "specexec, version" in res.output


def test_models_prune_keeps_the_converted_model_and_rm_removes_all(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECEXEC_HOME", str(tmp_path))
    model = model_store.DRAFT
    wheels, gguf, conv = tmp_path / "wheels", tmp_path / "gguf", model_store.converted_dir(model)
    wheels.mkdir()
    gguf.mkdir()
    conv.mkdir(parents=True)
    stem = model.package(1).replace("-", "_")
    (wheels / f"{stem}-{model.version}-py3-none-any.whl").write_bytes(b"x" * 100)
    (gguf / f"{model.name}.gguf").write_bytes(b"y" * 50)
    (conv / "model.safetensors").write_bytes(b"z" * 10)
    res = CliRunner().invoke(main, ["models", "prune"])
    assert res.exit_code == 0 and "not converted: kept" in res.output  # no done marker yet
    assert (gguf / f"{model.name}.gguf").exists()
    (conv / model_store.DONE_MARKER).write_text("")
    res = CliRunner().invoke(main, ["models", "prune"])
    assert res.exit_code == 0, res.output
    assert not any(wheels.iterdir()) and not any(gguf.iterdir()) and (conv / "model.safetensors").exists()
    res = CliRunner().invoke(main, ["models", "rm", model.name])
    assert res.exit_code == 0 and not conv.exists()
