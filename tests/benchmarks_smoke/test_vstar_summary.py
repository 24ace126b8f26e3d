"""benchmarks.vstar_summary reads each method's paired difference to TIGER and draws them."""

from __future__ import annotations

from benchmarks.vstar_summary import METHODS, differences, label, plot


def run(dataset: str, shift: float, command: str = "python benchmarks/vstar.py") -> dict:
    test = {m: {"vs_tiger": {"recall@10": {"diff": shift + i, "ci_low": shift + i - 0.5, "ci_high": shift + i + 0.5,
                                           "p_value": 0.5}}} for i, m in enumerate(METHODS)}
    return {"dataset": dataset, "test_users": 1234, "command": command, "test": test}


def test_differences_are_the_paired_tests_against_tiger():
    d = differences(run("x", 0.01))
    assert list(d) == list(METHODS)
    assert d["vstar_ved"] == (3.01, 2.51, 3.51)


def test_label_names_the_rl_seed_and_the_users():
    assert label(run("scientific", 0.0, "python b.py -S vstar.loop.seed=2027 --users 0")) == \
        "scientific seed 2027\n1,234 test users"


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "p.png"
    plot({"a": run("a", 0.0), "b": run("b", -1.0)}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
