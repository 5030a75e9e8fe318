"""A relocatable home: records under $COUPLET_HOME name paths relative to it, so a home copied elsewhere works."""

from pathlib import Path

from couplet.catalog import Catalog


# --------------------------------------------------------------------------- Catalog.relative / resolve


def test_relative_names_paths_under_the_home_in_posix_form(tmp_path):
    catalog = Catalog(tmp_path / "home")
    run = catalog.model_dir("abc-123")
    assert catalog.relative(run) == "models/abc-123"
    assert catalog.relative(str(catalog.stage_dir("build", "k") / "train" / "len-05.parquet")) == "data/processed/build/k/train/len-05.parquet"
    assert catalog.relative("models/abc-123") == "models/abc-123"  # already a record
    page = (catalog.reports_dir / "gx" / "index.html").as_uri()
    assert catalog.relative(page) == "reports/gx/index.html"  # a file:// URL (GX Data Docs)
    outside = tmp_path / "src" / "couplet.tar.gz"
    assert catalog.relative(outside) == str(outside)  # an input outside the home stays absolute


def test_relative_sees_through_a_symlinked_home(tmp_path):
    real = tmp_path / "real"
    (real / "models" / "m").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert Catalog(link).relative(real / "models" / "m") == "models/m"
    assert Catalog(real).relative(link / "models" / "m") == "models/m"


def test_resolve_joins_records_to_the_current_home(tmp_path):
    catalog = Catalog(tmp_path / "b")
    assert catalog.resolve("models/abc-123") == tmp_path / "b" / "models" / "abc-123"
    assert catalog.resolve(catalog.relative(catalog.validation_report_dir("r1"))) == catalog.validation_report_dir("r1")
    assert catalog.uri("reports/gx/x y.html") == (tmp_path / "b" / "reports" / "gx" / "x y.html").as_uri()
    assert catalog.uri("https://example.org/docs/index.html") == "https://example.org/docs/index.html"


def test_resolve_reads_old_absolute_records(tmp_path):
    """Records written before paths were relative hold the old home's absolute paths."""
    old_home, new_home = tmp_path / "models" / "old-home", tmp_path / "new-home"  # "models" in the old home's own path
    existing = tmp_path / "elsewhere" / "data" / "processed" / "build" / "k"
    existing.mkdir(parents=True)
    catalog = Catalog(new_home)
    assert catalog.resolve(str(existing)) == existing  # absolute and still there: used as is

    for rel in ("models/run-1", "data/processed/ingest/k1/pairs.parquet", "reports/validation/r1"):
        (new_home / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".parquet"):
            (new_home / rel).touch()
        else:
            (new_home / rel).mkdir()
        recorded = str(old_home / rel)  # the old home is gone: the layout part is re-anchored here
        assert catalog.resolve(recorded) == new_home / rel
    page = (old_home / "reports" / "validation" / "r1").as_uri()
    assert catalog.resolve(page) == new_home / "reports" / "validation" / "r1"
    assert catalog.uri(page) == (new_home / "reports" / "validation" / "r1").as_uri()

    gone = str(old_home / "models" / "never-copied")
    assert catalog.resolve(gone) == Path(gone)  # nothing to re-anchor to: the path as recorded, for the error


def test_resolved_turns_the_named_fields_into_paths_under_the_home(tmp_path):
    catalog = Catalog(tmp_path / "home")
    record = {"build_dir": "data/processed/build/k", "key": "k", "model": None}
    out = catalog.resolved(record, ("build_dir", "model", "absent"))
    assert out == {"build_dir": str(tmp_path / "home" / "data" / "processed" / "build" / "k"), "key": "k", "model": None}
    assert record["build_dir"] == "data/processed/build/k"  # a copy
