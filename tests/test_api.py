import json
import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner

import specexec
from specexec.launch.api import Busy, Job, Request, Scheduler, StopMatcher
from specexec.launch.cli import main
from tiny_models import save_tiny_pair

PROMPT = "w10 w11 w12"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def llm(tiny_pair):
    paths, _ = tiny_pair
    with specexec.load(paths["target"], paths["draft"], in_process=True, dtype="float32", budget=8) as model:
        yield model


def cli_json(paths, *args):
    res = CliRunner().invoke(main, ["generate", PROMPT, "--target", paths["target"], "--draft", paths["draft"],
                                    "--json", "--dtype", "float32", "--budget", "8", "--in-process", *args],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_import_is_light_and_versioned():
    code = "import sys, specexec; print(specexec.__version__); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] != "0.0.0+unknown" and out[1] == "False"


@pytest.mark.parametrize("chat", [False, None])
def test_generate_gives_the_cli_token_ids(tiny_pair, llm, chat):
    paths, _ = tiny_pair
    cli = cli_json(paths, "--max-new-tokens", "12", *(["--raw"] if chat is False else []))
    out = llm.generate(PROMPT, max_new_tokens=12, chat=chat)
    assert out.token_ids == cli["token_ids"] and out.text == cli["text"]
    assert out.prompt_tokens == cli["prompt_tokens"]
    assert out.stats["new_tokens"] == len(out.token_ids) and out.stats["target_forwards"] >= 1
    assert out.finish_reason == ("stop" if 2 in out.token_ids else "length")


def test_stream_joins_to_the_same_text(llm):
    plain = llm.generate(PROMPT, max_new_tokens=16, chat=False)
    pieces = list(llm.stream(PROMPT, max_new_tokens=16, chat=False))
    assert len(pieces) >= 1 and "".join(pieces) == plain.text


def test_messages_and_system_use_the_chat_template(llm):
    by_text = llm.generate("w9", max_new_tokens=4)
    by_messages = llm.generate([{"role": "user", "content": "w9"}], max_new_tokens=4)
    assert by_text.token_ids == by_messages.token_ids and by_text.prompt_tokens == 3
    with_system = llm.generate("w9", max_new_tokens=4, system="w7")
    assert with_system.prompt_tokens == 5  # "<system> w7 <user> w9 <assistant>"


def test_stop_string_cuts_text_and_ends_generation(llm):
    plain = llm.generate(PROMPT, max_new_tokens=16, chat=False)
    words = plain.text.split()
    assert len(words) >= 4, plain.text
    stop = words[2]
    cut = llm.generate(PROMPT, max_new_tokens=16, chat=False, stop=[stop, "never-there"])
    assert cut.finish_reason == "stop"
    assert cut.text == plain.text[:plain.text.index(stop)]
    assert plain.token_ids[:len(cut.token_ids)] == cut.token_ids and len(cut.token_ids) < len(plain.token_ids)
    streamed = "".join(llm.stream(PROMPT, max_new_tokens=16, chat=False, stop=stop))
    assert streamed == cut.text


def test_closing_a_stream_stops_its_generation(llm):
    stream = llm.stream(PROMPT, max_new_tokens=200, chat=False, budget=1)
    next(stream)
    stream.close()
    after = llm.generate(PROMPT, max_new_tokens=3, chat=False)  # the queue moved on
    assert len(after.token_ids) <= 3


def test_bad_requests_are_value_errors(llm):
    for bad in (dict(prompt=[]), dict(prompt=[{"role": "user"}]), dict(prompt="w1", max_new_tokens=-1),
                dict(prompt="w1", temperature=-1.0), dict(prompt="w1", stop=3), dict(prompt="w1", method="beam")):
        with pytest.raises(ValueError):
            llm.generate(**bad)


def test_unknown_load_option_is_refused():
    with pytest.raises(TypeError, match="bogus"):
        specexec.load(bogus=1)


def test_context_manager_closes(tiny_pair):
    paths, _ = tiny_pair
    with specexec.load(paths["target"], paths["draft"], in_process=True, dtype="float32") as model:
        model.generate("w1", max_new_tokens=2)
    with pytest.raises(RuntimeError, match="closed"):
        model.generate("w1", max_new_tokens=2)


def test_stop_matcher_holds_back_possible_starts():
    m = StopMatcher(("END",))
    assert m.push("abc E") == "abc " and m.push("N") == "" and m.push("x") == "ENx"
    assert m.push("yyEND zzz") == "yy" and m.hit and m.text == "abc ENxyy"
    m = StopMatcher(("END",))
    assert m.push("abE") == "ab" and m.flush() == "E" and m.text == "abE"




def test_scheduler_is_fifo_and_bounded():
    gate, order = threading.Event(), []

    def run(job):
        gate.wait()
        order.append(job.request.context)
        job.sink(job.request.context)

    sched = Scheduler(run, max_queued=2)
    done = []
    jobs = [Job(Request([1], None, context=str(i)), done.append) for i in range(3)]
    sched.submit(jobs[0])
    while not sched.active:  # the worker has taken the first job
        pass
    sched.submit(jobs[1])
    sched.submit(jobs[2])
    with pytest.raises(Busy):
        sched.submit(Job(Request([1], None, context="x"), done.append))
    gate.set()
    while len(done) < 3:
        pass
    sched.close()
    assert order == ["0", "1", "2"]


def test_scheduler_close_fails_waiting_jobs():
    gate, done = threading.Event(), []
    sched = Scheduler(lambda job: (gate.wait(), job.sink("ran")), max_queued=4)
    sched.submit(Job(Request([1], None), done.append))
    while not sched.active:
        pass
    waiting = Job(Request([1], None), done.append)
    sched.submit(waiting)
    closer = threading.Thread(target=sched.close)
    closer.start()
    while not waiting.cancel.is_set():
        pass
    gate.set()
    closer.join()
    assert isinstance(done[0], RuntimeError) and done[1] == "ran"


@pytest.mark.parametrize("method", ["specexec"])
def test_top_k_and_min_p_sampling_stays_lossless(llm, method):
    """A seeded SpecExec run emits what plain sampling with the same rule emits, whatever the trees
    (SpecInfer's rule is lossless in distribution but spends its uniforms differently)."""
    settings = dict(max_new_tokens=16, chat=False, temperature=1.0, seed=11, top_k=5, min_p=0.05)
    plain = llm.generate(PROMPT, method="autoregressive", **settings)
    assert llm.generate(PROMPT, method=method, **settings).token_ids == plain.token_ids
    assert llm.generate(PROMPT, method="autoregressive", **{**settings, "top_k": 0}).token_ids != plain.token_ids


def test_repetition_penalty_is_lossless_and_is_transformers_own(tiny_pair, llm):
    """Greedy with penalty 1.3: the speculative answer equals plain autoregressive decoding with the
    penalty, which equals transformers' own greedy `generate(repetition_penalty=1.3)`, and differs
    from the unpenalized answer. Seeded sampling at t=0.8 emits the same tokens either way too."""
    import torch
    _, target = tiny_pair
    settings = dict(max_new_tokens=24, chat=False, repetition_penalty=1.3)
    spec = llm.generate(PROMPT, **settings)
    plain = llm.generate(PROMPT, method="autoregressive", **settings)
    assert spec.token_ids == plain.token_ids
    assert spec.token_ids != llm.generate(PROMPT, max_new_tokens=24, chat=False).token_ids
    ids = llm.encode(PROMPT, chat=False)
    with torch.inference_mode():
        ref = target.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=1.3,
                              eos_token_id=2, pad_token_id=2)[0, len(ids):].tolist()
    assert spec.token_ids == ref
    sampled = dict(settings, temperature=0.8, seed=5)
    assert llm.generate(PROMPT, **sampled).token_ids == llm.generate(PROMPT, method="autoregressive",
                                                                      **sampled).token_ids


def test_cli_repetition_penalty_flag(tiny_pair, llm):
    paths, _ = tiny_pair
    cli = cli_json(paths, "--max-new-tokens", "12", "--raw", "--repetition-penalty", "1.3")
    assert cli["token_ids"] == llm.generate(PROMPT, max_new_tokens=12, chat=False, repetition_penalty=1.3).token_ids
    two_process = CliRunner().invoke(main, ["generate", PROMPT, "--target", paths["target"], "--draft", paths["draft"],
                                            "--json", "--dtype", "float32", "--budget", "8", "--max-new-tokens", "12",
                                            "--raw", "--repetition-penalty", "1.3"], catch_exceptions=False)
    assert json.loads(two_process.stdout)["token_ids"] == cli["token_ids"]  # the penalty crossed the wire
    res = CliRunner().invoke(main, ["generate", PROMPT, "--repetition-penalty", "0"])
    assert res.exit_code == 2 and "repetition-penalty" in res.output
