"""Stage 2 — validate: row rules, rejects, and the Great Expectations suite as the batch gate.

Row rules are computed with pyarrow (fast, vectorised) a chunk of rows at a time, so memory does not
grow with the batch; every row that breaks one goes to `rejects.parquet` with the names of the rules
it broke. The versioned GX suite in `couplet/data/suites/couplet_pairs.json` checks the same properties
independently (its own regexes and pandas kernels) with `mostly = 1 - max_reject_rate`, chunk by chunk,
its results merged into one verdict on the whole batch and one Data Docs page per run.
A batch-level failure raises `ValidationFailed` with a one-line reason and writes nothing downstream.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from couplet.core.atomic import atomic_write_json, atomic_write_text
from couplet.core.catalog import DATASET_LAYOUT, REPORT_FILES, VALIDATE_FILES, Catalog
from couplet.core.config import DataConfig
from couplet.data.expectations import SuiteRun, suite_version
from couplet.core.locks import hold_lock
from couplet.data.punct import CJK_RANGES, PUNCTUATION
from couplet.core.stage import run_cached, stage_key
from couplet.data.streaming import HashSpill, RowGroupWriter, parquet_rows, read_batches

RULES = ("non_empty", "equal_length", "punctuation_aligned", "allowed_chars", "max_length", "up_differs_from_down")
N_EXAMPLES = 5
# Rows per partition: each is checked by one task of the flow's task runner (threads, or Dask workers).
# The outputs do not depend on it: partitions are concatenated back in row order.
CHUNK_ROWS = 250_000
PAIR_COLUMNS = ["split", "line_no", "up", "down"]
FRAME_COLUMNS = [*PAIR_COLUMNS, "up_len", "down_len", "up_punct", "down_punct", "up_differs"]  # what the GX suite reads

# How a stage runs its partitions: `partitions(fn, calls)` returns `[fn(*args) for args in calls]`, in order,
# computed wherever it likes (flows/pipeline.py submits each call as a Prefect task). None: here, one by one.
Partitions = Callable[[Callable[..., Any], list[tuple]], list[Any]]


class ValidationFailed(RuntimeError):
    """The batch as a whole is unusable; the message is one line naming the rule(s)."""

    def __init__(self, message: str, report_md: str = "", data_docs_page: str | None = None):
        super().__init__(message)
        self.report_md = report_md
        self.data_docs_page = data_docs_page


def _re2_class() -> str:
    cjk = "".join(f"\\x{{{lo:X}}}-\\x{{{hi:X}}}" for lo, hi in CJK_RANGES)
    return cjk + "".join(re.escape(ch) for ch in sorted(PUNCTUATION))


def python_allowed_regex() -> str:
    """The allowed-characters rule as a Python regex (what GX's pandas backend evaluates)."""
    cjk = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in CJK_RANGES)
    punct = "".join(re.escape(ch) for ch in sorted(PUNCTUATION))
    return f"^[{cjk}{punct}]+$"


def _punct_pattern(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Each character becomes `P` (punctuation) or `.` (anything else), e.g. 春风，秋雨 -> ..P..

    Lines without punctuation (most of them) get an empty pattern, which compares equal to the
    other side's only if that has none either; the regex rewrite runs only where it is needed.
    """
    punct = "".join(re.escape(ch) for ch in sorted(PUNCTUATION))
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    has_punct = pc.match_substring_regex(column, f"[{punct}]")
    subset = column.filter(has_punct)
    marked = pc.replace_substring_regex(subset, f"[{punct}]", "\x01")
    dotted = pc.replace_substring_regex(marked, "[^\x01]", ".")
    pattern = pc.replace_substring(dotted, "\x01", "P")
    return pc.replace_with_mask(pc.if_else(has_punct, "", ""), has_punct, pattern)


def add_rule_columns(table: pa.Table, max_len: int) -> pa.Table:
    """Derived columns used by the rules and the GX suite."""
    up, down = table["up"], table["down"]
    up_len, down_len = pc.utf8_length(up), pc.utf8_length(down)
    allowed = f"^[{_re2_class()}]+$"
    return (
        table.append_column("up_len", up_len)
        .append_column("down_len", down_len)
        .append_column("up_punct", _punct_pattern(up))
        .append_column("down_punct", _punct_pattern(down))
        .append_column("up_differs", pc.not_equal(up, down))
        .append_column("chars_ok", pc.and_(pc.match_substring_regex(up, allowed), pc.match_substring_regex(down, allowed)))
    )


def rule_failures(table: pa.Table, max_len: int) -> dict[str, pa.Array]:
    """For each rule, a boolean array that is true where the row breaks it."""
    up_len, down_len = table["up_len"], table["down_len"]
    non_empty_ok = pc.and_(pc.greater(up_len, 0), pc.greater(down_len, 0))
    return {
        "non_empty": pc.invert(non_empty_ok),
        "equal_length": pc.and_(non_empty_ok, pc.not_equal(up_len, down_len)),
        "punctuation_aligned": pc.and_(pc.equal(up_len, down_len), pc.not_equal(table["up_punct"], table["down_punct"])),
        "allowed_chars": pc.and_(non_empty_ok, pc.invert(table["chars_ok"])),
        "max_length": pc.or_(pc.greater(up_len, max_len), pc.greater(down_len, max_len)),
        "up_differs_from_down": pc.and_(non_empty_ok, pc.invert(table["up_differs"])),
    }


def validate_key(ingest_key: str, cfg: DataConfig) -> str:
    return stage_key("validate", suite_version(), ingest_key, cfg.max_len, cfg.max_reject_rate)


def gx_parameters(cfg: DataConfig) -> dict:
    """Values for the suite's `$PARAMETER`s."""
    return {
        "max_len": cfg.max_len,
        "min_pass_fraction": max(0.0, 1.0 - cfg.max_reject_rate),
        "allowed_regex": python_allowed_regex(),
    }


# --------------------------------------------------------------------------- report


def _markdown_report(summary: dict) -> str:
    lines = [
        f"# Validation of dataset {summary['dataset_version']}",
        "",
        f"**{'PASSED' if summary['success'] else 'FAILED'}**" + (f": {summary['reason']}" if summary.get("reason") else ""),
        "",
        "| rows in | passed | rejected | reject rate | duplicate rate |",
        "| --- | --- | --- | --- | --- |",
        f"| {summary['rows_in']:,} | {summary['rows_passed']:,} | {summary['rejected']:,} | "
        f"{summary['reject_rate']:.4%} | {summary['duplicate_rate']:.4%} |",
        "",
        "## Rejects per rule",
        "",
        "| rule | rows | examples (split:line up / down) |",
        "| --- | --- | --- |",
    ]
    for rule in RULES:
        n = summary["rejects_per_rule"].get(rule, 0)
        examples = "<br>".join(
            f"{e['split']}:{e['line_no']} `{e['up'][:40]}` / `{e['down'][:40]}`" for e in summary["examples"].get(rule, [])
        )
        lines.append(f"| {rule} | {n:,} | {examples} |")
    lines += ["", "## Line lengths (upper line, all rows)", "", "| length | rows | |", "| --- | --- | --- |"]
    peak = max(summary["length_histogram"].values() or [1])
    for length, n in sorted(summary["length_histogram"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {length} | {n:,} | {'█' * max(1, round(30 * n / peak)) if n else ''} |")
    lines += ["", "## Great Expectations", "", "| expectation | column | success | unexpected % |", "| --- | --- | --- | --- |"]
    for e in summary["gx"]["expectations"]:
        lines.append(f"| {e['expectation']} | {e['column']} | {'✅' if e['success'] else '❌'} | {e['unexpected_percent']:.4f} |")
    docs = summary["gx"].get("data_docs_page") or summary["gx"]["data_docs_index"]
    lines += ["", f"Data Docs: {docs}" + ("" if "://" in docs else " (under $COUPLET_HOME)"), ""]
    return "\n".join(lines)


def read_validation_index(home: Path) -> dict:
    """`reports/validation/index.json`: {"runs": [entry, ...]}, oldest first (no runs when it is missing or unreadable)."""
    try:
        index = json.loads(Catalog(home).validation_index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"runs": []}
    return index if isinstance(index, dict) and isinstance(index.get("runs"), list) else {"runs": []}


def _register_report(home: Path, entry: dict) -> None:
    with hold_lock(home, "reports/validation-index"):
        index = read_validation_index(home)
        index["runs"].append(entry)
        atomic_write_json(Catalog(home).validation_index, index)


def check_partition(chunk: pa.Table, max_len: int) -> dict:
    """The row rules over one partition of the pairs (columns split, line_no, up, down).

    Returns the GX frame's columns (`frame`), which rows are rejected (`rejected`), the rejects with
    the rules they broke, the rows per rule, the first examples per rule and the upper-line lengths.
    A pure function of its arguments: it runs in a thread or on a Dask worker alike.
    """
    table = add_rule_columns(chunk, max_len)
    failures = rule_failures(table, max_len)
    any_failure = failures[RULES[0]]
    for rule in RULES[1:]:
        any_failure = pc.or_(any_failure, failures[rule])
    rejects = table.filter(any_failure).select(PAIR_COLUMNS)
    rejected_rules = [pc.filter(failures[rule], any_failure) for rule in RULES]
    rules_column = pa.array(
        [[rule for rule, broken in zip(RULES, flags) if broken] for flags in zip(*(a.to_pylist() for a in rejected_rules))]
        if rejects.num_rows
        else [],
        pa.list_(pa.string()),
    )
    per_rule = {rule: int(pc.sum(failures[rule]).as_py() or 0) for rule in RULES}
    examples = {rule: table.filter(failures[rule]).slice(0, N_EXAMPLES).select(PAIR_COLUMNS).to_pylist()
                for rule in RULES if per_rule[rule]}
    lengths = {int(item["values"]): int(item["counts"]) for item in pc.value_counts(table["up_len"]).to_pylist()}
    return {
        "frame": table.select(FRAME_COLUMNS),
        "rejected": pa.chunked_array([any_failure], pa.bool_()) if isinstance(any_failure, pa.Array) else any_failure,
        "rejects": rejects.append_column("rules", rules_column),
        "per_rule": per_rule,
        "examples": examples,
        "lengths": lengths,
    }


def run_validate(ingest: dict, cfg: DataConfig, home: Path, force: bool = False, flow_run_id: str | None = None,
                 partitions: Partitions | None = None) -> dict:
    """Stage 2. Returns a small manifest; raises ValidationFailed when the batch is unusable.

    `partitions` runs the row rules of each chunk of rows (see `Partitions`); the GX suite, the report
    and every file are done here, on the whole batch, into the stage's temporary folder.
    """
    start = time.perf_counter()
    key = validate_key(ingest["key"], cfg)
    catalog = Catalog(home)
    out_dir = catalog.stage_dir("validate", key)
    result = run_cached("validate", key, out_dir,
                        lambda folder: _validate_into(folder, out_dir, key, ingest, cfg, home, flow_run_id, partitions),
                        force=force, started=start)
    # the manifest names paths relative to the home; the caller gets them under the current home
    result = catalog.resolved(result, ("passed_path", "rejects_path", "report_path"))
    if result.get("data_docs_page"):
        result["data_docs_page"] = catalog.uri(result["data_docs_page"])
    return result


PASSED_SCHEMA = pa.schema([("split", pa.string()), ("line_no", pa.int32()), ("up", pa.string()), ("down", pa.string())])
REJECTS_SCHEMA = PASSED_SCHEMA.append(pa.field("rules", pa.list_(pa.string())))
WINDOW = 2  # partitions in flight at once: memory holds this many chunks, not the batch
SPILL_ROWS = 1 << 18  # rows per hash bucket of the exact distinct-pair count
GX_ROWS = CHUNK_ROWS  # rows per pandas frame shown to the GX suite (its results are merged over the batch)


def _windows(chunks: Iterator[pa.Table], size: int) -> Iterator[list[tuple[int, pa.Table]]]:
    """(first row, chunk) in groups of `size`."""
    window, start = [], 0
    for chunk in chunks:
        window.append((start, chunk))
        start += chunk.num_rows
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _validate_into(folder: Path, out_dir: Path, key: str, ingest: dict, cfg: DataConfig, home: Path, flow_run_id: str | None,
                   partitions: Partitions | None = None) -> dict:
    """Check every row and the batch, write the report, and (if the batch passes) passed/rejects into `folder`.

    The pairs are read, checked (`check_partition`, through `partitions`), written and shown to the GX suite
    one chunk of `CHUNK_ROWS` rows at a time; the GX results of the chunks are merged into one result for the
    batch (`SuiteRun`). Duplicate pairs are counted exactly over the whole batch through hash buckets on disk.
    """
    catalog = Catalog(home)
    pairs_path = catalog.resolve(ingest["pairs_path"])
    line_counts = ingest.get("line_counts", {})
    counts_equal = all(line_counts.get(DATASET_LAYOUT.upper_file(s)) == line_counts.get(DATASET_LAYOUT.lower_file(s))
                       for s in DATASET_LAYOUT.splits)
    now = datetime.now(timezone.utc)
    run_id = f"{now:%Y%m%dT%H%M%SZ}-{key[:8]}"
    spill_dir = folder / ".pairs-by-hash"
    per_rule = {rule: 0 for rule in RULES}
    examples: dict[str, list] = {}
    lengths: dict[int, int] = {}
    rows_in = rows_passed = rejected = 0
    try:
        spill = HashSpill(spill_dir, -(-parquet_rows(pairs_path) // SPILL_ROWS), ["up", "down"])
        with hold_lock(home, "reports/gx"):  # the GX project files are shared by concurrent runs
            suite_run = SuiteRun(home, gx_parameters(cfg), run_name=run_id)
            with RowGroupWriter(folder / VALIDATE_FILES.passed, PASSED_SCHEMA) as passed_out, \
                    RowGroupWriter(folder / VALIDATE_FILES.rejects, REJECTS_SCHEMA) as rejects_out:
                for window in _windows(read_batches(pairs_path, PAIR_COLUMNS, CHUNK_ROWS), WINDOW):
                    calls = [(chunk, cfg.max_len) for _, chunk in window]
                    parts = partitions(check_partition, calls) if partitions is not None else [check_partition(*c) for c in calls]
                    for (start, _), part in zip(window, parts):
                        frame = part["frame"]
                        passed = frame.filter(pc.invert(part["rejected"])).select(PAIR_COLUMNS)
                        passed_out.write(passed)
                        rejects_out.write(part["rejects"])
                        spill.add(frame.select(["up", "down"]))
                        for offset in range(0, max(frame.num_rows, 1), GX_ROWS):  # FRAME_COLUMNS, indexed by row in the batch
                            pandas_frame = frame.slice(offset, GX_ROWS).to_pandas()
                            pandas_frame.index = range(start + offset, start + offset + len(pandas_frame))
                            suite_run.add(pandas_frame)
                            del pandas_frame
                        rows_in += frame.num_rows
                        rows_passed += passed.num_rows
                        rejected += part["rejects"].num_rows
                        for rule in RULES:
                            per_rule[rule] += part["per_rule"][rule]
                        for rule, rows in part["examples"].items():
                            examples[rule] = (examples.get(rule, []) + rows)[:N_EXAMPLES]
                        for length, n in part["lengths"].items():
                            lengths[length] = lengths.get(length, 0) + n
                    del parts, calls, window
            gx_result = suite_run.finish()
        distinct = sum(table.group_by(["up", "down"]).aggregate([]).num_rows for table in spill.tables())
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)
    examples = {rule: examples[rule] for rule in RULES if rule in examples}
    reject_rate = rejected / rows_in if rows_in else 1.0
    reasons = []
    if rows_in == 0:
        reasons.append("no rows")
    if not counts_equal:
        reasons.append(f"in/out line counts differ: {line_counts}")
    if reject_rate > cfg.max_reject_rate:
        broken = ", ".join(f"{rule} {n:,}" for rule, n in per_rule.items() if n)
        reasons.append(f"{reject_rate:.2%} of rows rejected (max {cfg.max_reject_rate:.2%}): {broken}")
    failed_gx = [f"{e['expectation']}({e['column']}) {e['unexpected_percent']:.2f}%" for e in gx_result["expectations"] if not e["success"]]
    if failed_gx and not reasons:
        reasons.append("expectations failed: " + "; ".join(failed_gx))

    report_dir = catalog.validation_report_dir(run_id)
    gx_record = {**gx_result, "data_docs_index": catalog.relative(gx_result["data_docs_index"])}
    if gx_result.get("data_docs_page"):
        gx_record["data_docs_page"] = catalog.relative(gx_result["data_docs_page"])
    summary = {
        "run_id": run_id,
        "key": key,
        "flow_run_id": flow_run_id,
        "dataset_version": ingest["dataset_version"],
        "created_at": now.isoformat(timespec="seconds"),
        "success": not reasons,
        "reason": "; ".join(reasons),
        "rows_in": rows_in,
        "rows_passed": rows_passed,
        "rejected": rejected,
        "reject_rate": reject_rate,
        "rejects_per_rule": per_rule,
        "examples": examples,
        "duplicate_rate": (rows_in - distinct) / rows_in if rows_in else 0.0,
        "length_histogram": {str(length): n for length, n in sorted(lengths.items())},
        "line_counts": line_counts,
        "gx": gx_record,  # paths in records are relative to the home (Catalog.relative)
        "report_dir": catalog.relative(report_dir),
        "report_path": catalog.relative(report_dir / REPORT_FILES.report),
    }
    report_md = _markdown_report(summary)
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_dir / REPORT_FILES.report, report_md)
    atomic_write_json(report_dir / REPORT_FILES.summary, summary)
    if reasons:  # the failing rows, for inspection (copied, then renamed into place)
        partial = report_dir / f".rejects-{os.getpid()}.parquet"
        shutil.copyfile(folder / VALIDATE_FILES.rejects, partial)
        os.replace(partial, report_dir / REPORT_FILES.rejects)
    _register_report(home, {k: summary[k] for k in ("run_id", "key", "flow_run_id", "dataset_version", "created_at", "success", "report_dir")}
                     | {"data_docs_page": gx_record.get("data_docs_page")})
    if reasons:
        raise ValidationFailed(
            f"validation failed: {summary['reason']} (report: {report_dir / REPORT_FILES.report})",
            report_md=report_md,
            data_docs_page=gx_result.get("data_docs_page"),
        )

    atomic_write_text(folder / VALIDATE_FILES.report, report_md)
    return {
        "dataset_version": ingest["dataset_version"],
        "ingest_key": ingest["key"],
        "rows_in": rows_in,
        "rows_passed": rows_passed,
        "rejected": rejected,
        "rejects_per_rule": per_rule,
        "duplicate_rate": summary["duplicate_rate"],
        "passed_path": catalog.relative(out_dir / VALIDATE_FILES.passed),
        "rejects_path": catalog.relative(out_dir / VALIDATE_FILES.rejects),
        "report_path": summary["report_path"],
        "data_docs_page": gx_record.get("data_docs_page"),
        "params": {"max_len": cfg.max_len, "max_reject_rate": cfg.max_reject_rate, "suite_version": suite_version()},
    }


def latest_report(home: Path, run: str | None = None) -> dict | None:
    """The index entry of the newest validation report, or of the run whose id/flow-run id starts with `run`,
    with `report_dir` and `data_docs_page` (a file:// URL) under the current home."""
    catalog = Catalog(home)
    runs = read_validation_index(home)["runs"]
    if run:
        runs = [r for r in runs if r["run_id"].startswith(run) or (r.get("flow_run_id") or "").startswith(run) or r["key"].startswith(run)]
    if not runs:
        return None
    entry = catalog.resolved(runs[-1], ("report_dir",))  # recorded relative to the home (older entries: absolute)
    if entry.get("data_docs_page"):
        entry["data_docs_page"] = catalog.uri(entry["data_docs_page"])
    return entry
