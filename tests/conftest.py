import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/datagen.py and friends

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# Test files that share the session's end-to-end training (`trained_home`): one xdist worker runs them all,
# so the training runs once.
SHARING_TRAINED_HOME = {"test_relocate.py", "test_faults.py"}


def pytest_collection_modifyitems(items) -> None:
    """Every integration test is also slow: `-m "not slow"` is the fast tier (README, "Two commands").

    Under `./test.sh` (pytest-xdist, `--dist loadgroup`) each file runs on one worker, so its module-scoped
    set-up (a Dask cluster, a served model) is built once; the files sharing `trained_home` go together.
    """
    for item in items:
        if item.get_closest_marker("integration") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("trained-home" if name in SHARING_TRAINED_HOME else name))
    # Files with slow tests first (order within a file kept): the long ones start at once on both workers
    # instead of one of them finishing the suite alone.
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


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


# A tiny model trained end to end, small enough for a test, promoted although it cannot beat the dictionary baseline.
TINY_RUN = ["--until", "evaluate", "--set", "train.max_steps=40", "--set", "model.embed_dim=32", "--set", "model.n_blocks=2",
            "--set", "train.num_threads=1", "--set", "evaluate.n_samples=3", "--set", "train.checkpoint_every=20",
            "--set", "promote.require_baseline=false"]


@dataclass(frozen=True)
class TrainedHome:
    """A $COUPLET_HOME after `couplet run --source SOURCE *TINY_RUN`, moved away from where the run wrote it."""

    home: Path  # copy it (shutil.copytree(..., symlinks=True)); never change it, other tests copy it too
    written_at: Path  # where the run wrote the home: gone, as a home copied elsewhere and deleted
    source: Path  # the dataset the run read: gone too; `kept_source` holds its bytes
    kept_source: Path
    summary: dict  # the run's --json summary


@pytest.fixture(scope="session")
def trained_home(tmp_path_factory, prefect_home) -> TrainedHome:
    """One end-to-end training run shared by the tests that start from a trained home (the slowest set-up)."""
    from datagen import write_dataset_tarball

    root = tmp_path_factory.mktemp("trained")
    source = write_dataset_tarball(root / "source" / "couplet.tar.gz", n_train=300, n_test=30)
    written_at = root / "home-as-written"
    written_at.mkdir()
    env = {**os.environ, "COUPLET_HOME": str(written_at), "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.run([sys.executable, "-m", "couplet", "run", "--source", str(source), *TINY_RUN, "--json"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=written_at)
    assert run.returncode == 0, run.stderr[-3000:]
    home, kept_source = root / "home", root / "kept" / "couplet.tar.gz"
    written_at.rename(home)
    kept_source.parent.mkdir()
    source.rename(kept_source)
    return TrainedHome(home, written_at, source, kept_source, json.loads(run.stdout.strip().splitlines()[-1]))


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """One random-weight model folder (tests/modelkit.py) for the tests that only read it."""
    from modelkit import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-model")


@pytest.fixture(scope="module")
def tiny_predictor(tiny_model_dir):
    """`tiny_model_dir` loaded on one torch thread, as `couplet serve` runs (two threads spin badly on a busy
    2-core box); the thread count is restored after the module."""
    import torch

    from couplet.predictor import Predictor

    before = torch.get_num_threads()
    yield Predictor.load(tiny_model_dir, num_threads=1)
    torch.set_num_threads(before)


# The HTTP API under a real uvicorn server in a thread (tests/test_serve_api.py, tests/test_serve_faults.py).


@pytest.fixture(scope="module")
def served(tiny_predictor):
    """The default app behind a `BodyReads` recorder, under a real server: (base URL, recorder)."""
    from servers import BodyReads, serve_in_thread

    from couplet.serving import create_app

    recorder = BodyReads(create_app(tiny_predictor))
    with serve_in_thread(recorder) as url:
        yield url, recorder


@pytest.fixture(scope="module")
def base_url(served) -> str:
    return served[0]


@pytest.fixture
def body_reads(served):
    recorder = served[1]
    recorder.clear()
    return recorder


@pytest.fixture(scope="module")
def unbatched_url(tiny_predictor):
    """The threadpool variant, with a short body timeout to test 408 quickly."""
    from servers import serve_in_thread

    from couplet.serving import create_app

    with serve_in_thread(create_app(tiny_predictor, batching=False, body_timeout_s=0.5)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    import httpx

    with httpx.Client(base_url=base_url, timeout=10) as c:
        yield c
