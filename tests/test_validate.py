import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import snapshot
from datagen import layout_files, make_pairs, write_tarball

from couplet.core.catalog import Catalog
from couplet.core.config import DataConfig
from couplet.data.ingest import run_ingest
from couplet.data.validate import (
    RULES,
    ValidationFailed,
    add_rule_columns,
    latest_report,
    read_validation_index,
    rule_failures,
    run_validate,
)

ROWS = [
    ("春风入户", "秋月临窗", []),
    ("春风，入户", "秋月，临窗", []),
    ("", "秋月", ["non_empty"]),
    ("春风入户", "秋月临", ["equal_length"]),
    ("春风，入户", "秋月临，窗", ["punctuation_aligned"]),
    ("春风ab", "秋月cd", ["allowed_chars"]),
    ("春" * 40, "秋" * 40, ["max_length"]),
    ("春风入户", "春风入户", ["up_differs_from_down"]),
    ("春风，入户", "秋月临窗", ["equal_length"]),
    ("𠀀风", "秋月", []),  # CJK Extension B is a Chinese character too
]


def test_rules_flag_exactly_the_broken_ones():
    table = pa.table({"up": [r[0] for r in ROWS], "down": [r[1] for r in ROWS]})
    failures = rule_failures(add_rule_columns(table, 34), 34)
    for i, (_, _, expected) in enumerate(ROWS):
        broken = [rule for rule in RULES if failures[rule][i].as_py()]
        assert broken == expected, (ROWS[i], broken)


def _ingest_rows(tmp_path, home, train_rows, cfg):
    files = layout_files(train_rows, make_pairs(5, seed=7))
    source = write_tarball(tmp_path / "data.tar.gz", files)
    return run_ingest(DataConfig(source=str(source), **cfg), home)


def test_rejects_keep_rule_names_and_report(tmp_path, home):
    good = make_pairs(200)
    rows = good + [(u, d) for u, d, rules in ROWS if rules]
    cfg = {"max_reject_rate": 0.1}
    ingested = _ingest_rows(tmp_path, home, rows, cfg)
    result = run_validate(ingested, DataConfig(**cfg), home)
    assert result["status"] == "completed"
    rejects = pq.read_table(result["rejects_path"]).to_pylist()
    assert sorted(tuple(r["rules"]) for r in rejects) == sorted(tuple(rules) for _, _, rules in ROWS if rules)
    assert result["rows_passed"] == 205  # 200 train + 5 test
    report = Path(result["report_path"]).read_text()
    assert "equal_length" in report and "Line lengths" in report and "duplicate rate" in report
    assert result["data_docs_page"].startswith("file://") and Path(result["data_docs_page"][7:]).is_file()
    entry = latest_report(home)
    assert entry["success"] and entry["key"] == result["key"]
    # cached the second time: no new GX run, no new report
    again = run_validate(ingested, DataConfig(**cfg), home)
    assert again["status"] == "cached"
    assert len(json.loads((home / "reports" / "validation" / "index.json").read_text())["runs"]) == 1


def test_batch_failure_is_one_line_and_writes_nothing_downstream(tmp_path, home):
    bad = [(u, d[:-1]) for u, d in make_pairs(50)]  # every row misaligned
    ingested = _ingest_rows(tmp_path, home, bad + make_pairs(50, seed=3), {})
    before = snapshot(home / "data" / "processed")
    with pytest.raises(ValidationFailed) as info:
        run_validate(ingested, DataConfig(), home)
    message = str(info.value)
    assert "\n" not in message
    assert "equal_length 50" in message and "max 5.00%" in message
    assert snapshot(home / "data" / "processed") == before
    entry = latest_report(home)
    assert not entry["success"]
    assert (Path(entry["report_dir"]) / "rejects.parquet").is_file()  # failing rows kept for inspection
    assert "FAILED" in (Path(entry["report_dir"]) / "report.md").read_text()


def test_changed_threshold_changes_key(tmp_path, home):
    ingested = _ingest_rows(tmp_path, home, make_pairs(30), {})
    a = run_validate(ingested, DataConfig(), home)
    b = run_validate(ingested, DataConfig(max_len=20), home)
    assert a["key"] != b["key"] and b["status"] == "completed"


def test_chunked_validation_gives_the_whole_batch_result(tmp_path, monkeypatch):
    """Chunks of 7 rows (the GX suite run per chunk, its results merged) and one chunk: the same counts,
    duplicate rate, GX verdicts and files, for a batch that passes and one that fails; one stored GX result
    and one Data Docs page per run either way."""
    import couplet.data.validate as validate_module

    rows = make_pairs(60, seed=5) + make_pairs(10, seed=5) + [(u, d) for u, d, rules in ROWS if rules]
    misaligned = [(u, d[:-1]) for u, d in make_pairs(6, seed=9)]  # equal_length: 6 of 86 rows, over 5%
    for case, train, max_reject_rate in (("passes", rows, 0.2), ("fails", rows + misaligned, 0.05)):
        source = write_tarball(tmp_path / case / "data.tar.gz", layout_files(train, make_pairs(5, seed=7)))
        config = DataConfig(source=str(source), max_reject_rate=max_reject_rate)
        results = {}
        for name, chunk_rows in (("one", 10**9), ("many", 7)):
            home = tmp_path / case / name
            home.mkdir()
            monkeypatch.setattr(validate_module, "CHUNK_ROWS", chunk_rows)
            monkeypatch.setattr(validate_module, "SPILL_ROWS", 10 if chunk_rows == 7 else 1 << 20)
            ingested = run_ingest(config, home)
            try:
                result = run_validate(ingested, config, home)
                files = [Path(result["passed_path"]).read_bytes(), Path(result["rejects_path"]).read_bytes()]
            except ValidationFailed:
                assert case == "fails"
                files = [(Path(latest_report(home)["report_dir"]) / "rejects.parquet").read_bytes()]
            summary = json.loads((Path(latest_report(home)["report_dir"]) / "summary.json").read_text())
            stored = list((home / "reports" / "gx" / "uncommitted" / "validations").rglob("*.json"))
            pages = list((home / "reports" / "gx" / "uncommitted" / "data_docs" / "local_site" / "validations").rglob("*.html"))
            assert len(stored) == 1 and len(pages) == 1, (stored, pages)
            results[name] = (summary, files)
        (one, one_files), (many, many_files) = results["one"], results["many"]
        assert one_files == many_files
        assert one["duplicate_rate"] > 0 and many["duplicate_rate"] == one["duplicate_rate"]
        for key in ("success", "reason", "rows_in", "rows_passed", "rejected", "rejects_per_rule", "examples", "length_histogram"):
            assert many[key] == one[key], key
        assert many["gx"]["expectations"] == one["gx"]["expectations"]
        assert all(e["success"] for e in one["gx"]["expectations"]) == (case == "passes")


def test_an_unreadable_validation_index_reads_as_no_runs(home):
    index = Catalog(home).validation_index
    index.parent.mkdir(parents=True)
    for text in ("{half", '{"runs": 3}', "[]"):
        index.write_text(text, encoding="utf-8")
        assert read_validation_index(home) == {"runs": []}
        assert latest_report(home) is None
