"""Inter-process locks (couplet.core.locks)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from couplet.core.locks import LockTimeout, hold_lock, lock_path


def test_lock_path_is_under_home_and_flat(tmp_path):
    assert lock_path(tmp_path, "models/registry") == tmp_path / ".locks" / "models-registry.lock"
    assert lock_path(tmp_path, "/data/processed/build/ab12/") == tmp_path / ".locks" / "data-processed-build-ab12.lock"
    with pytest.raises(ValueError):
        lock_path(tmp_path, "//")


def test_second_holder_times_out_with_one_clear_line(tmp_path):
    with hold_lock(tmp_path, "models/run-1"):
        started = time.monotonic()
        with pytest.raises(LockTimeout) as err:
            with hold_lock(tmp_path, "models/run-1", timeout_s=0.3):
                pass
        assert 0.25 <= time.monotonic() - started < 3
    message = str(err.value)
    assert message.startswith("another couplet run is writing models/run-1; waited 0.3 s")
    assert f"held by pid {os.getpid()}" in message and "\n" not in message
    with hold_lock(tmp_path, "models/run-1", timeout_s=0):  # released on exit
        pass


def test_other_resources_do_not_wait(tmp_path):
    with hold_lock(tmp_path, "models/run-1"):
        with hold_lock(tmp_path, "models/run-2", timeout_s=0):
            pass


def test_lock_released_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with hold_lock(tmp_path, "models/registry"):
            raise RuntimeError("boom")
    with hold_lock(tmp_path, "models/registry", timeout_s=0):
        pass


def _hold(home, ready, seconds):
    with hold_lock(home, "data/processed"):
        ready.set()
        time.sleep(seconds)


def test_waits_for_another_process_then_takes_the_lock(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_hold, args=(str(tmp_path), ready, 0.5))
    child.start()
    try:
        assert ready.wait(10)
        started = time.monotonic()
        with hold_lock(tmp_path, "data/processed", timeout_s=10, poll_s=0.02):
            waited = time.monotonic() - started
        assert 0.2 < waited < 5
    finally:
        child.join(10)


def test_a_killed_holder_releases_the_lock(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_hold, args=(str(tmp_path), ready, 60))
    child.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LockTimeout, match=f"held by pid {child.pid}"):
            with hold_lock(tmp_path, "data/processed", timeout_s=0.1):
                pass
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        with hold_lock(tmp_path, "data/processed", timeout_s=5):
            pass
    finally:
        if child.is_alive():
            child.kill()
            child.join()
