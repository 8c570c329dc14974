import json

import pytest
from click.testing import CliRunner

from specexec.launch import bench
from specexec.launch.cli import main
from tiny_models import save_tiny_pair


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("benchpair"))[0]


@pytest.fixture(scope="module")
def bench_run(tiny_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    prompts = out / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "w10 w11 w12"}\n{"id": "b", "prompt": "w40 w41"}\n')
    args = ["bench", "--target", tiny_pair["target"], "--draft", tiny_pair["draft"], "--dtype", "float32",
            "--prompts", str(prompts), "--max-new-tokens", "10", "--methods",
            "specexec,specinfer,chain,autoregressive,hf-assisted", "--budgets", "2,8", "--temperatures", "0,0.7",
            "--out", str(out / "r.jsonl"), "--plot", str(out / "r.png"), "--in-process"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res, out


def test_table_has_every_column_and_row(bench_run):
    res, _ = bench_run
    header = [line for line in res.stdout.splitlines() if "gen_rate" in line][0]
    for column in bench.COLUMNS:
        assert column in header
    rows = [line for line in res.stdout.splitlines() if " | " in line and "gen_rate" not in line]
    # 2 temperatures x (3 tree methods x 2 budgets + autoregressive + hf-assisted)
    assert len(rows) == 2 * (3 * 2 + 2)


def test_jsonl_records_and_gen_rate(bench_run):
    _, out = bench_run
    records = [json.loads(line) for line in (out / "r.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * (3 * 2 + 2)  # temperatures x prompts x configurations
    generate_keys = {"method", "budget", "new_tokens", "target_forwards", "gen_rate", "tokens_per_s", "wall_s",
                     "draft_s", "verify_s"}
    for r in records:
        assert {"method", "budget", "temperature", "prompt_id", "stats"} <= set(r)
        assert generate_keys <= set(r["stats"])
        s = r["stats"]
        assert s["gen_rate"] == pytest.approx(s["new_tokens"] / s["target_forwards"], abs=1e-3)
    hf = [r for r in records if r["method"] == "hf-assisted"]
    assert hf and all(r["stats"]["target_forwards"] >= 1 for r in hf)


def test_plot_is_a_png(bench_run):
    _, out = bench_run
    data = (out / "r.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_summary_speedup_is_against_autoregressive_from_the_same_run():
    def rec(method, budget, new, fwd, wall):
        stats = {"new_tokens": new, "target_forwards": fwd, "wall_s": wall, "draft_s": 0.0, "verify_s": wall,
                 "decode_tokens_per_s": new / wall, "mean_tree_size": budget, "mean_tree_depth": 1.0,
                 "overlap_hit_rate": 0.0}
        return bench.Record(method, budget, 0.0, "s", "p", stats)
    rows = bench.summarize([rec("autoregressive", 0, 10, 10, 5.0), rec("specexec", 8, 10, 4, 2.0)])
    spec = next(r for r in rows if r["method"] == "specexec")
    assert spec["gen_rate"] == 2.5 and spec["speedup"] == pytest.approx(2.5)
    alone = bench.summarize([rec("specexec", 8, 10, 4, 2.0)])  # no baseline: no ratio, not NaN
    assert alone[0]["speedup"] is None and alone[0]["decode speedup"] is None
    assert bench.format_table(alone).splitlines()[-1].rstrip().endswith("- |              -")


def test_table_says_what_budget_auto_picked():
    def rec(pid, picked):
        stats = {"new_tokens": 8, "target_forwards": 2, "wall_s": 1.0, "draft_s": 0.5, "verify_s": 0.5,
                 "decode_tokens_per_s": 8.0, "mean_tree_size": picked, "mean_tree_depth": 3.0,
                 "overlap_hit_rate": 0.0, "budget": picked}
        return bench.Record("specexec", "auto", 0.0, "s", pid, stats)
    table = bench.format_table(bench.summarize([rec("a", 32), rec("b", 16)]))
    assert "auto(16,32)" in table


def test_chain_budgets_past_the_depth_limit_run_once():
    spec = bench.BenchSpec(methods=("specexec", "chain", "autoregressive"), budgets=(16, 32, 64, 256, "auto"),
                           max_depth=32)
    assert spec.configs() == [("specexec", 16), ("specexec", 32), ("specexec", 64), ("specexec", 256),
                              ("specexec", "auto"), ("chain", 16), ("chain", 32), ("chain", "auto"),
                              ("autoregressive", 0)]


def test_jsonl_keeps_every_round_and_the_template(bench_run):
    _, out = bench_run
    records = [json.loads(line) for line in (out / "r.jsonl").read_text().splitlines()]
    ours = [r for r in records if r["method"] != "hf-assisted"]
    for r in ours:
        assert r["template"] == "raw" and r["rounds"]
        assert {"tree_size", "tree_depth", "accepted", "draft_s", "verify_s"} <= set(r["rounds"][0])
        assert sum(x["accepted"] for x in r["rounds"]) == r["stats"]["new_tokens"] == len(r["token_ids"])


def test_reference_gen_rate_drops_the_first_round_and_the_stop_token_and_averages_prompts():
    def rec(accepted, reason):
        rounds = [{"accepted": a} for a in accepted]
        return bench.Record("specexec", 8, 0.0, "s", "p", {"finish_reason": reason}, rounds)
    # prompt 1: rounds after the first emit 4+2 = 6 tokens in 2 passes, the last one a stop token: 5/2
    # prompt 2: 3+3+3 in 3 passes, stopped by length: 3
    assert bench.reference_gen_rate([rec([9, 4, 2], "stop"), rec([1, 3, 3, 3], "length")]) == pytest.approx(2.75)
    assert bench.reference_gen_rate([rec([5], "stop")]) is None  # nothing after the prefill round


def test_offloaded_regime_in_a_memory_cgroup(tiny_pair, tmp_path):
    """A self-started verifier streaming its layers from disk, inside a cgroup: the table shows what
    each pass read and the cgroup's peak; output identical to the target alone in the same run."""
    from specexec.launch.memory_cap import CapOptions, CapUnavailable, MemoryCap
    try:
        MemoryCap.create(CapOptions("1G")).close()
    except CapUnavailable as err:
        pytest.skip(f"no memory cgroup here: {err}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "w10 w11 w12"}\n')
    args = ["bench", "--target", tiny_pair["target"], "--draft", tiny_pair["draft"], "--dtype", "float32",
            "--prompts", str(prompts), "--max-new-tokens", "8", "--methods", "specexec,autoregressive",
            "--budgets", "4", "--max-memory", "cpu=300KB", "--offload-folder", str(tmp_path / "off"),
            "--verifier-memory-cap", "1500M", "--out", str(tmp_path / "r.jsonl")]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"specexec", "autoregressive"}
    assert len({tuple(r["token_ids"]) for r in records}) == 1  # speculation changes nothing
    for r in records:
        assert r["stats"]["verifier_memory"] == "cgroup" and 0 < r["stats"]["verifier_peak_rss_mb"] < 1500
        assert r["stats"]["read_gb_per_pass"] > 0 and r["stats"]["read_gbps"] > 0
    assert "GB/pass" in res.stdout and "verifier MB" in res.stdout


def test_an_empty_prompt_set_is_a_clear_error_not_an_index_error():
    from specexec.launch.bench import BenchSpec, run_bench
    with pytest.raises(ValueError, match="prompt set 'mine' holds no prompts"):
        run_bench(lambda *a: None, {"mine": []}, {"mine": []}, BenchSpec())
    with pytest.raises(ValueError, match="no prompt sets"):
        run_bench(lambda *a: None, {}, {}, BenchSpec())


def test_each_method_can_run_at_its_own_shape(tiny_pair, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "w10 w11 w12"}\n')
    out = tmp_path / "r.jsonl"
    args = ["bench", "--target", tiny_pair["target"], "--draft", tiny_pair["draft"], "--dtype", "float32",
            "--prompts", str(prompts), "--max-new-tokens", "12", "--methods", "specexec,specinfer:2x3",
            "--budgets", "8", "--temperatures", "0.7", "--no-warmup", "--in-process", "--out", str(out)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    records = {r["method"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"specexec", "specinfer:2x3"} and "specinfer:2x3" in res.stdout
    shaped = records["specinfer:2x3"]["rounds"]
    assert all(x["tree_depth"] <= 3 and x["tree_size"] <= 6 for x in shaped)  # 2 chains x depth 3
    assert max(x["tree_size"] for x in records["specexec"]["rounds"]) > 6  # the shared shape: 16 wide, 32 deep


@pytest.mark.parametrize("method, message", [
    ("specinfer:4by8", "a shape is WIDTHxDEPTH"),
    ("specinfer:0x8", "a shape is WIDTHxDEPTH"),
    ("autoregressive:2x2", "grows no tree of ours"),
    ("beam:2x2", "unknown method 'beam:2x2'"),
])
def test_bad_method_shapes_are_named(tiny_pair, method, message):
    res = CliRunner().invoke(main, ["bench", "--target", tiny_pair["target"], "--methods", method])
    assert res.exit_code == 2 and message in res.output
