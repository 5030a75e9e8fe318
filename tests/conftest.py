import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/datagen.py and friends

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty $COUPLET_HOME for one test."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("COUPLET_HOME", str(path))
    return path


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> Path:
    """One PREFECT_HOME (SQLite database) shared by the CLI runs of a session, so each run skips the migrations."""
    return tmp_path_factory.mktemp("prefect-home")


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory` with its size and mtime: to assert that nothing changed."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: tiny ops gain nothing from a second thread on a shared 2-core box."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
