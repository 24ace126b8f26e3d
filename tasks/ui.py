"""What a run shows in the Prefect UI: run names, and artifacts with its results.

Artifacts (the run page's Artifacts tab, and the global Artifacts page by key):
- `leaderboard-<dataset>` (table, evaluate): every method's validation and test metrics and its
  paired differences (validation: against the champion; test: against TIGER).
- `run-report-<dataset>` (markdown, evaluate): reports/<dataset>/report.md, its plots linked.
- `gates-<dataset>` (table, ingest and candidates): the Great Expectations gate results.
- `promotion-<dataset>` (markdown, candidates): the promotion decision and why.
- `published-dump-<dataset>` (link, candidates): the published dump's `current` folder.

Outside a Prefect run (a task body called through `.fn()`) nothing is published, so tests of
task bodies need no server.
"""

from __future__ import annotations

import re
from pathlib import Path

from tasks.params import Params


def in_run() -> bool:
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


def key(kind: str, dataset: str) -> str:
    """An artifact key: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{kind}-{dataset}".lower()).strip("-")


def run_name(stage: str, params: Params) -> str:
    """`<stage>-<dataset>-<params hash>`: the runs of one configuration share a name."""
    return f"{stage}-{params.data.dataset}-{params.section_hash()}"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def champion_entry(board: dict) -> dict:
    """The champion's row of a leaderboard (its validation metrics): not always the first row."""
    return next(m for m in board["methods"] if m["method"] == board["champion"])


def leaderboard_rows(board: dict, results: dict) -> list[dict]:
    """One row per method: validation metrics, the paired recall@10 difference against the
    champion on the validation users, test metrics and the paired test difference against TIGER."""
    rows = []
    champion = champion_entry(board)["metrics"]["recall@10"]
    for place, entry in enumerate(board["methods"], start=1):
        method, valid = entry["method"], entry["metrics"]
        row = {"place": place, "method": method, "valid recall@10": _fmt(valid.get("recall@10")),
               "valid ndcg@10": _fmt(valid.get("ndcg@10")),
               "valid recall@10 - champion": _fmt(valid.get("recall@10", 0.0) - champion)}
        if method == board.get("runner_up"):
            m = board["margin"]["recall@10"]
            row["valid recall@10 - champion"] += f" (paired p {m['p_value']:.3f})"
        test = results.get(method, {})
        for k in ("recall@10", "ndcg@10", "recall@200"):
            row[f"test {k}"] = _fmt(test.get("metrics", {}).get(k, ""))
        vs = next((v for name, v in test.items() if name.startswith("vs_")), None)
        row["test recall@10 vs tiger"] = (f"{vs['recall@10']['diff']:+.4f} (p {vs['recall@10']['p_value']:.3f})"
                                          if vs and "recall@10" in vs else "")
        rows.append(row)
    return rows


def publish_leaderboard(dataset: str, board: dict, results: dict) -> None:
    if not in_run():
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(leaderboard_rows(board, results), key=key("leaderboard", dataset),
                          description=f"{dataset}: every method on the validation split (the champion, "
                                      f"{board['champion']}, is dumped) and on the test split")


def publish_report(dataset: str, report: Path) -> None:
    """The run report as markdown; its images become links to the PNG files."""
    if not in_run() or not report.is_file():
        return
    from prefect.artifacts import create_markdown_artifact

    text = report.read_text(encoding="utf-8")
    text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)",
                  lambda m: f"[plot: {m.group(1) or m.group(2)}]({(report.parent / m.group(2)).resolve().as_uri()})",
                  text)
    create_markdown_artifact(text, key=key("run-report", dataset), description=f"{dataset}: {report}")


def gate_rows(reports: list[dict]) -> list[dict]:
    """`run_gate`'s records (a gate that fails stops the stage, so these passed)."""
    return [{"suite": r["suite"], "success": r["success"], "expectations": r["expectations"], "rows": r["rows"]}
            for r in reports]


def publish_gates(dataset: str, reports: list[dict], stage: str) -> None:
    if not in_run() or not reports:
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(gate_rows(reports), key=key(f"gates-{stage}", dataset),
                          description=f"{dataset}: Great Expectations gates of the {stage} stage")


def publish_promotion(dataset: str, decision: dict, published: Path | None) -> None:
    if not in_run():
        return
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    verdict = "published" if decision["promoted"] else "refused: the earlier dump stays published"
    lines = [f"# Promotion of the {dataset} candidate dump: {verdict}", "", decision["reason"], "",
             "| | method | validation recall@10 |", "|---|---|---|",
             f"| this run | {decision['method']} | {decision['recall@10']:.4f} |"]
    if "published" in decision:
        p = decision["published"]
        lines.append(f"| published ({p['version']}) | {p['method']} | {p['recall@10']:.4f} |")
    lines += ["", f"tolerance {decision['tolerance']:g}, {decision['users']} validation users"]
    create_markdown_artifact("\n".join(lines), key=key("promotion", dataset), description=verdict)
    if published is not None:
        create_link_artifact(published.resolve().as_uri(), link_text=f"{dataset}: published dump {published.name}",
                             key=key("published-dump", dataset), description="data/<dataset>/published/current")
