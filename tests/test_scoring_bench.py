"""`omni-ctl bench-lib` at small sizes: the plain functions and the command
produce every figure (the numbers themselves are machine-dependent)."""

from click.testing import CliRunner

from omni_ctl.bench.lib import bench_decision, bench_lib, format_bench, run_bench


def test_run_bench_quick_has_every_figure(tmp_path):
    res = run_bench(quick=True, json_seconds=0.01)
    assert res["hash"]["tokens_per_s"] > 0
    assert res["index"]["entries"] == res["index"]["instances"] \
        * res["index"]["blocks_per_instance"]
    assert res["index"]["bytes_per_entry"] <= 64
    assert res["match"]["warm"]["median_us"] > 0
    assert res["insert"]["evicted"] > 0
    assert res["decision"]["policy_only_us"] > 0
    lines = format_bench(res)
    for word in ("hash", "index", "insert", "match", "decision"):
        assert any(line.startswith(word) for line in lines), word


def test_decision_figure_alone():
    d = bench_decision(instances=8, prompt_tokens=256, reps=200)
    assert d["full_us"] >= d["policy_only_us"] > 0


def test_command_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_lib, ["--quick", "--json-seconds", "0.01",
                                            "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "match" in result.output and out.read_text().startswith("{")
