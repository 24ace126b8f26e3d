"""Great Expectations gates: every stage validates what it is about to hand on.

`run_gate` validates a polars frame against a list of expectations (GE 1.x validates
pandas, so the frame goes through `to_pandas()`), saves the validation result as JSON
under `reports/<dataset>/gates/<suite>.json`, and raises `QualityGateError` naming the
failed expectation, its column and a few offending rows. Gates run before anything
downstream is written.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

import polars as pl

from tasks import io

MAX_SHOWN_ROWS = 5


class QualityGateError(RuntimeError):
    """A data-quality expectation failed; the message says which, where, and shows rows."""


@functools.cache
def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


@functools.cache
def _batch_definition(name: str):
    ctx = _context()
    source = ctx.data_sources.add_pandas(f"pandas-{name}")
    return source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("whole")


def gx_expectations():
    import great_expectations.expectations as gxe

    return gxe


def run_gate(suite_name: str, frame: pl.DataFrame, expectations: Sequence[Any], report_dir: Path | None) -> dict:
    """Validate `frame`; save the result; raise QualityGateError if any expectation fails."""
    import great_expectations as gx

    ctx = _context()
    try:
        ctx.suites.delete(suite_name)
    except Exception:  # a suite of that name did not exist yet
        pass
    suite = ctx.suites.add(gx.ExpectationSuite(name=suite_name))
    for exp in expectations:
        suite.add_expectation(exp)
    batch = _batch_definition(suite_name).get_batch(batch_parameters={"dataframe": frame.to_pandas()})
    result = batch.validate(suite, result_format="SUMMARY")
    payload = result.to_json_dict()
    if report_dir is not None:
        io.write_json(Path(report_dir) / "gates" / f"{suite_name}.json", payload)
    if not result.success:
        raise QualityGateError(describe_failures(suite_name, frame, result))
    return {"suite": suite_name, "success": True, "expectations": len(result.results), "rows": frame.height}


def describe_failures(suite_name: str, frame: pl.DataFrame, result: Any) -> str:
    lines = [f"quality gate {suite_name!r} failed:"]
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
        column = kwargs.pop("column", None) or kwargs.pop("column_list", None)
        res = r.result or {}
        lines.append(
            f"- {cfg.type} on column {column!r} ({kwargs}): "
            f"{res.get('unexpected_count', '?')} of {res.get('element_count', frame.height)} rows unexpected"
        )
        index = res.get("partial_unexpected_index_list") or []
        if index:
            rows = frame[[int(i) for i in index[:MAX_SHOWN_ROWS]]].to_dicts()
            lines.append("  offending rows: " + json.dumps(rows, default=str))
        elif res.get("observed_value") is not None:
            lines.append(f"  observed: {res['observed_value']}")
    return "\n".join(lines)
