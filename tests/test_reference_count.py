import pytest

from specexec.launch.reference_count import Count, count, mean_gen_rate, needed_tokens

EOS = 99


def ids_for(accepted, eos_at=None):
    ids = [1000 + i for i in range(sum(accepted))]
    if eos_at is not None:
        ids[eos_at] = EOS
    return ids


def test_first_round_dropped_last_counted_round_counted_whole():
    accepted = [30, 10, 20, 40, 5, 5]  # after the first: 10, 30, 70 >= 64: the 40 counts whole, then stop
    c = count(accepted, ids_for(accepted), 64, {EOS})
    assert c == Count(70, 3, True)
    assert c.gen_rate == pytest.approx(70 / 3)


def test_eos_ends_the_count_and_is_not_counted():
    accepted = [5, 4, 6, 8]
    c = count(accepted, ids_for(accepted, eos_at=5 + 4 + 2), 64, {EOS})  # third token of round 2
    assert c == Count(4 + 2, 2, True)


def test_a_run_too_short_is_marked_incomplete():
    accepted = [33, 19, 10, 1, 1]  # a 64-token run of ours: 31 tokens after the first round
    c = count(accepted, ids_for(accepted), 64, {EOS})
    assert c == Count(31, 4, False)


def test_mean_is_over_prompts_not_pooled():
    counts = [Count(64, 2, True), Count(66, 11, True), Count(0, 0, True)]
    assert mean_gen_rate(counts) == pytest.approx((32 + 6) / 2)
    assert mean_gen_rate([]) is None


def test_needed_tokens_leaves_the_last_counted_round_its_full_depth():
    # worst case: a first round of max_depth + 1 tokens, then rounds of one token
    n, depth = 64, 32
    budget_tokens = needed_tokens(n, depth)
    last_start = (depth + 1) + (n - 1)  # new tokens before the last counted round, at most
    assert budget_tokens - last_start - 1 >= depth


def test_records_of_a_bench_jsonl_are_counted_and_other_methods_skipped(tmp_path, capsys):
    import json
    from specexec.launch.reference_count import count_records, main
    rec = {"method": "specexec", "prompt_set": "humaneval", "prompt_id": "HumanEval/0", "budget": 64,
           "temperature": 0.0, "rounds": [{"accepted": a} for a in (30, 40, 30)], "token_ids": ids_for([30, 40, 30])}
    ar = dict(rec, method="autoregressive", rounds=[{"accepted": 1}] * 100, token_ids=[1000] * 100)
    path = tmp_path / "run.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps(ar) + "\n")
    rows = count_records(path.read_text().splitlines(), 64, [EOS])
    assert [c for _, c in rows] == [Count(70, 2, True)]
    main([str(path), "--n", "64", "--eos", str(EOS)])
    assert "mean over prompts: 35.00" in capsys.readouterr().out
