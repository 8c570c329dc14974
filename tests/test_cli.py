import json

import pytest
from click.testing import CliRunner

from specexec.launch.cli import main
from tiny_models import greedy_reference, save_tiny_pair, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


def generate(paths, *args):
    runner = CliRunner()
    return runner.invoke(main, ["generate", "--target", paths["target"], "--draft", paths["draft"], *args],
                         catch_exceptions=False)


@pytest.mark.parametrize("method", ["specexec", "specinfer", "chain", "autoregressive"])
def test_generate_json_matches_target_greedy(tiny_pair, method):
    paths, target = tiny_pair
    res = generate(paths, "w10 w11 w12", "--raw", "--json", "--method", method, "--budget", "8",
                   "--max-new-tokens", "12", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    prompt = tiny_tokenizer()("w10 w11 w12")["input_ids"]
    ref = greedy_reference(target, prompt, 12)
    if 2 in ref:  # the tiny model may emit its end-of-sequence token
        ref = ref[: ref.index(2) + 1]
    assert out["token_ids"] == ref
    assert out["prompt_tokens"] == 3
    stats = out["stats"]
    assert set(stats) >= {"method", "budget", "new_tokens", "target_forwards", "gen_rate", "tokens_per_s",
                          "wall_s", "draft_s", "verify_s"}
    assert stats["method"] == method and stats["new_tokens"] == len(ref)
    assert stats["gen_rate"] == pytest.approx(stats["new_tokens"] / stats["target_forwards"], abs=1e-3)


def test_streaming_output_and_stats_line(tiny_pair):
    paths, _ = tiny_pair
    res = generate(paths, "hello there", "--max-new-tokens", "6", "--dtype", "float32")
    assert res.exit_code == 0
    assert "tokens in" in res.stderr and "target passes" in res.stderr and "specexec budget 16" in res.stderr
    assert res.stdout.strip()  # the streamed text


def test_chat_is_default_when_the_tokenizer_has_a_template(tiny_pair):
    paths, _ = tiny_pair
    chat = json.loads(generate(paths, "w9", "--json", "--max-new-tokens", "2").stdout)
    raw = json.loads(generate(paths, "w9", "--json", "--raw", "--max-new-tokens", "2").stdout)
    assert chat["prompt_tokens"] == 3  # "<user> w9 <assistant>", as the template lays it out
    assert raw["prompt_tokens"] == 1


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "Invalid value for '--budget'"),
    (["--temperature", "-1"], "Invalid value for '--temperature'"),
    (["--top-p", "1.5"], "Invalid value for '--top-p'"),
    (["--method", "beam"], "Invalid value for '--method'"),
    (["--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
])
def test_bad_flags_are_named(tiny_pair, args, message):
    paths, _ = tiny_pair
    res = generate(paths, "w1", *args)
    assert res.exit_code == 2 and message in res.output


def test_missing_model_path_is_a_clear_error(tiny_pair, tmp_path):
    paths, _ = tiny_pair
    res = CliRunner().invoke(main, ["generate", "w1", "--target", str(tmp_path / "nope"), "--draft", paths["draft"]])
    assert res.exit_code == 1 and "does not exist" in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["generate", "w1", "--target", str(tmp_path / "empty"), "--draft", paths["draft"]])
    assert res.exit_code == 1 and "no config.json" in res.output


def test_mismatched_vocabularies_are_refused(tmp_path):
    small, _ = save_tiny_pair(tmp_path / "a", vocab=96)
    big, _ = save_tiny_pair(tmp_path / "b", vocab=128)
    res = CliRunner().invoke(main, ["generate", "w1", "--target", big["target"], "--draft", small["draft"]])
    assert res.exit_code == 1 and "vocabulary" in res.output


def test_models_list_shows_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECEXEC_HOME", str(tmp_path))
    res = CliRunner().invoke(main, ["models", "list"])
    assert res.exit_code == 0
    assert "qwen2.5-coder-0.5b-instruct" in res.output and "not fetched" in res.output


def _json(res):
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_self_started_verifier_and_in_process_agree(tiny_pair):
    paths, target = tiny_pair
    args = ["w10 w11 w12", "--raw", "--json", "--budget", "6", "--max-new-tokens", "16", "--dtype", "float32"]
    in_process = _json(generate(paths, *args, "--in-process"))
    two_process = _json(generate(paths, *args))
    no_overlap = _json(generate(paths, *args, "--no-overlap"))
    overlap = _json(generate(paths, *args, "--overlap"))
    assert in_process["token_ids"] == two_process["token_ids"] == no_overlap["token_ids"] == overlap["token_ids"]
    assert two_process["stats"]["bytes_sent"] > 0 and "bytes_sent" not in in_process["stats"]


def test_the_default_budget_follows_the_verifiers_placement(tiny_pair, tmp_path):
    """An offloaded target (a pass costs about the same for 1 or 128 tokens) gets the offloaded
    budget by default, told by the verifier process in its Welcome; a budget given is kept."""
    from specexec.drafter.tree_config import DEFAULT_BUDGET, OFFLOADED_BUDGET
    paths, target = tiny_pair
    args = ["w10 w11 w12", "--raw", "--json", "--max-new-tokens", "12", "--dtype", "float32"]
    offloaded = ["--max-memory", "cpu=300KB", "--offload-folder", str(tmp_path / "off")]
    in_ram = _json(generate(paths, *args, "--in-process"))
    streamed = _json(generate(paths, *args, *offloaded))  # a verifier process of its own, told over the wire
    given = _json(generate(paths, *args, *offloaded, "--in-process", "--budget", "8"))
    assert in_ram["stats"]["budget"] == DEFAULT_BUDGET
    assert streamed["stats"]["budget"] == OFFLOADED_BUDGET and given["stats"]["budget"] == 8
    assert in_ram["token_ids"] == streamed["token_ids"] == given["token_ids"]


def test_a_streaming_verifier_prefills_in_long_chunks_and_says_it_streams(tiny_pair, tmp_path):
    """Every forward of a streamed target reads all its weights: its prompt goes in few, long chunks."""
    from specexec.launch.options import PlacementOptions
    from specexec.launch.serving import ServeOptions, build_service
    from specexec.verifier.session import PREFILL_CHUNK, STREAMED_PREFILL_CHUNK
    paths, _ = tiny_pair
    in_ram = build_service(ServeOptions(paths["target"], dtype="float32"))
    streamed = build_service(ServeOptions(paths["target"], dtype="float32", placement=PlacementOptions(
        max_memory="cpu=300KB", offload_folder=str(tmp_path / "off"))))
    assert (in_ram.target.offloaded, in_ram.config.prefill_chunk) == (False, PREFILL_CHUNK)
    assert (streamed.target.offloaded, streamed.config.prefill_chunk) == (True, STREAMED_PREFILL_CHUNK)


@pytest.fixture
def served_cli(tiny_pair, tmp_path):
    """`specexec serve` in its own process on a free loopback port, with a key file."""
    import subprocess
    import sys
    from specexec.launch.options import READY_LINE
    from test_remote import free_port
    paths, _ = tiny_pair
    key = tmp_path / "hmac.key"
    key.write_text("k" * 64)
    key.chmod(0o600)
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "specexec.launch.cli", "serve", "--target", paths["target"], "--bind",
                             address, "--key-file", str(key), "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.startswith(READY_LINE), line
    yield address, key, proc
    if proc.poll() is None:
        proc.terminate()
    proc.wait(10)


def test_connect_to_a_served_verifier(tiny_pair, served_cli, tmp_path):
    paths, _ = tiny_pair
    address, key, _ = served_cli
    args = ["w10 w11 w12", "--raw", "--json", "--budget", "6", "--max-new-tokens", "16", "--dtype", "float32"]
    local = _json(generate(paths, *args, "--in-process"))
    remote = _json(generate(paths, *args, "--connect", address, "--key-file", str(key)))
    assert remote["token_ids"] == local["token_ids"]
    wrong = tmp_path / "wrong.key"
    wrong.write_text("w" * 64)
    wrong.chmod(0o600)
    res = generate(paths, *args, "--connect", address, "--key-file", str(wrong), "--timeout", "3")
    assert res.exit_code == 1 and "bad_signature" in res.output and "token_ids" not in res.output


def test_serve_refuses_an_open_bind_without_a_key(tiny_pair):
    paths, _ = tiny_pair
    res = CliRunner().invoke(main, ["serve", "--target", paths["target"], "--bind", "tcp://0.0.0.0:5999"])
    assert res.exit_code == 1 and "refusing to bind tcp://0.0.0.0:5999 without a key" in res.output


def test_keys_generate(tmp_path):
    res = CliRunner().invoke(main, ["keys", "generate", str(tmp_path / "k")])
    assert res.exit_code == 0
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key",
                 "hmac.key"):
        assert (tmp_path / "k" / name).is_file()
    assert oct((tmp_path / "k" / "server.key_secret").stat().st_mode)[-3:] == "600"


def test_budget_auto_explains_its_choice(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECEXEC_HOME", str(tmp_path))
    paths, _ = tiny_pair
    res = generate(paths, "w10 w11 w12", "--raw", "--json", "--budget", "auto", "--max-new-tokens", "20",
                   "--dtype", "float32", "--in-process")
    assert res.exit_code == 0, res.output
    assert "budget auto: expected tokens/s per budget" in res.stderr and "<- chosen" in res.stderr
    chosen = json.loads(res.stdout)["stats"]["budget"]
    assert chosen in (1, 2, 4, 8, 16, 32, 64)
    assert list((tmp_path / "profiles").glob("target-*.json")) and list((tmp_path / "profiles").glob("draft-*.json"))
    res = generate(paths, "w1", "--budget", "zero")
    assert res.exit_code == 2 and "neither a positive integer nor 'auto'" in res.output


def test_chat_keeps_the_models_between_turns(tiny_pair):
    paths, _ = tiny_pair
    res = CliRunner().invoke(main, ["chat", "--target", paths["target"], "--draft", paths["draft"], "--dtype",
                                    "float32", "--max-new-tokens", "5", "--in-process"],
                             input="w10 w11\nw12\n\n", catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.stdout.count("assistant> ") == 2 and res.stderr.count("tokens in") == 2


def test_unreachable_verifier_mid_generation_keeps_the_text(tiny_pair, served_cli):
    import signal
    import subprocess
    import sys
    import threading
    import time
    paths, _ = tiny_pair
    address, key, server = served_cli
    cmd = [sys.executable, "-m", "specexec.launch.cli", "generate", "w10 w11 w12", "--raw", "--connect", address,
           "--key-file", str(key), "--draft", paths["draft"], "--dtype", "float32", "--max-new-tokens", "100000",
           "--budget", "2", "--timeout", "3"]
    drafter = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=0)
    chunks = []
    errors = []
    readers = [threading.Thread(target=lambda: chunks.extend(iter(lambda: drafter.stdout.read(1), "")), daemon=True),
               threading.Thread(target=lambda: errors.append(drafter.stderr.read()), daemon=True)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 120
    while len("".join(chunks).split()) <= 5 and time.monotonic() < deadline and drafter.poll() is None:
        time.sleep(0.05)  # until the drafter has streamed some text (the tiny model's context is 512)
    server.send_signal(signal.SIGKILL)
    drafter.wait(60)
    for reader in readers:
        reader.join(10)
    err = "".join(errors)
    assert drafter.returncode == 1, err
    assert "no connection to the verifier" in err and "the text above is kept" in err
    assert len("".join(chunks).split()) > 5  # the streamed text is there


def test_full_context_stops_cleanly(tiny_pair):
    paths, _ = tiny_pair
    res = generate(paths, "w10 w11 w12", "--raw", "--json", "--budget", "8", "--max-new-tokens", "100000",
                   "--dtype", "float32", "--in-process")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert 512 - 8 <= out["prompt_tokens"] + len(out["token_ids"]) <= 512 + 1  # the tiny target's context
    assert "the target's context is full" in res.stderr


def test_profile_of_a_disk_streamed_target_shows_the_disk_limit(tiny_pair, tmp_path):
    paths, _ = tiny_pair
    res = CliRunner().invoke(main, ["profile", "--target", paths["target"], "--dtype", "float32", "--sizes", "1,8",
                                    "--prefix", "16", "--max-memory", "cpu=300KB",
                                    "--offload-folder", str(tmp_path / "off"), "--plot", str(tmp_path / "p.png")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "placement (disk streamed)" in res.output
    assert "GB read per pass" in res.output and "a forward takes at least" in res.output
    assert "forward time against that limit: 1: " in res.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
