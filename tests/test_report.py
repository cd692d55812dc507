import json

import pytest

from branchmerge.models.eval.report import (
    domains_of,
    results_bar_chart,
    results_table_markdown,
    results_table_plain,
    results_table_rich,
    table_rows,
)

RESULTS = {
    "base": {"arith": 0.1, "logic": 0.25, "algo": 0.0},
    "branch/arith": {"arith": 0.6, "logic": 0.2, "algo": 0.05},
    "merged": {"arith": 0.55, "logic": 0.4, "algo": 0.3},
    "rl": {"arith": 0.7, "logic": 0.45, "algo": 0.3333333},
}
EXTRA = {"base": {"mean_completion_tokens": 87.25}, "rl": {"mean_completion_tokens": 112.0}}


def test_rows_overall_is_mean_of_domains():
    rows = table_rows(RESULTS, EXTRA)
    assert [r["model"] for r in rows] == list(RESULTS)
    assert list(rows[0]) == ["model", "arith", "logic", "algo", "overall", "mean_completion_tokens"]
    for r in rows:
        assert r["overall"] == pytest.approx(sum(RESULTS[r["model"]].values()) / 3)
    assert rows[0]["mean_completion_tokens"] == 87.25 and rows[1]["mean_completion_tokens"] is None
    json.dumps(rows)


def test_markdown_exact_numbers():
    md = results_table_markdown(RESULTS, EXTRA)
    lines = md.strip().splitlines()
    assert lines[0] == "| model | arith | logic | algo | overall | mean_completion_tokens |"
    assert lines[1] == "| --- | ---: | ---: | ---: | ---: | ---: |"
    # overall: (0.1+0.25+0)/3 = 0.11667 ; (0.6+0.2+0.05)/3 = 0.28333 ; 1.25/3 = 0.41667 ; 1.4833333/3 = 0.49444
    assert lines[2] == "| base | 0.100 | 0.250 | 0.000 | 0.117 | 87.250 |"
    assert lines[3] == "| branch/arith | 0.600 | 0.200 | 0.050 | 0.283 | - |"
    assert lines[4] == "| merged | 0.550 | 0.400 | 0.300 | 0.417 | - |"
    assert lines[5] == "| rl | 0.700 | 0.450 | 0.333 | 0.494 | 112.000 |"
    assert len(lines) == 6


def test_missing_domain_and_union_of_columns():
    res = {"base": {"a": 0.5}, "branch/b": {"b": 1.0, "a": 0.0}}
    assert domains_of(res) == ["a", "b"]
    rows = table_rows(res)
    assert rows[0]["b"] is None and rows[0]["overall"] == 0.5
    assert "| base | 0.500 | - | 0.500 |" in results_table_markdown(res)


def test_plain_and_rich_tables():
    plain = results_table_plain(RESULTS)
    lines = plain.splitlines()
    assert lines[0].split() == ["model", "arith", "logic", "algo", "overall"]
    assert lines[-1].split() == ["rl", "0.700", "0.450", "0.333", "0.494"]
    # numbers right-aligned: every data line has the same length as the header (after rstrip only the tail)
    assert len({len(line) for line in lines}) == 1
    rich = results_table_rich(RESULTS, title="eval")
    assert "branch/arith" in rich and "0.283" in rich and "\x1b[" not in rich


def test_reserved_and_empty():
    with pytest.raises(ValueError, match="reserved"):
        table_rows({"base": {"overall": 1.0}})
    with pytest.raises(ValueError, match="empty"):
        table_rows({})


def test_bar_chart_png(tmp_path):
    out = results_bar_chart(RESULTS, tmp_path / "sub" / "results.png", title="pass@1")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000
    # IHDR: width/height big-endian at bytes 16..24
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 200
