"""Keep-alive connections spread over `couplet serve --workers N` (couplet/serving/balance.py)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time

import pytest

from couplet.serving.balance import ConnectionBalancer, SlotTable, create_slot_file
from procs import accepted_connections, descendants
from modelkit import UPPER
from servers import CLI, free_port


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def two_workers(tmp_path, clock):
    path = create_slot_file(tmp_path / "slots", 2)
    a = ConnectionBalancer(SlotTable(path), clock=clock)
    b = ConnectionBalancer(SlotTable(path, pid=os.getppid()), clock=clock)  # a live pid that is not ours
    return a, b


def test_slots_are_claimed_once_and_a_dead_workers_slot_is_reused(tmp_path):
    path = create_slot_file(tmp_path / "slots", 2)
    first, second = SlotTable(path), SlotTable(path, pid=os.getppid())
    assert {first.index, second.index} == {0, 1}
    with pytest.raises(ValueError, match="all 2 slots are held by live workers"):
        SlotTable(path, pid=1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    second.close()
    SlotTable(path, pid=dead.pid)  # claims the freed slot, then dies (its pid is gone)
    assert SlotTable(path, pid=1).index == 1  # a restarted worker takes the dead one's slot
    (tmp_path / "bad").write_bytes(b"123")
    with pytest.raises(ValueError, match="not a slot file"):
        SlotTable(tmp_path / "bad")


def test_a_lopsided_split_sheds_until_balanced_and_a_balanced_one_is_left_alone(tmp_path):
    clock = Clock()
    a, b = two_workers(tmp_path, clock)
    on = {("127.0.0.1", p): a for p in (5001, 5002, 5003, 5004)}  # 4-0: all four landed on worker a
    shed_in_round = []
    for _ in range(20):  # each connection sends a request every 0.1 s; a shed one reconnects to b
        clock.now += 0.1
        moved = [p for p, worker in on.items() if worker.should_close(p)]
        for p in moved:
            on[p] = b if on[p] is a else a
        shed_in_round.append(len(moved))
    assert sorted(list(on.values()).count(w) for w in (a, b)) == [2, 2]
    assert shed_in_round[0] == 1  # at 2 against 0 it sheds one, then no second within min_gap_s
    assert a.shed + b.shed == 2 and sum(shed_in_round[3:]) == 0  # balanced by the second round, left alone since


def test_idle_connections_age_out_of_the_count(tmp_path):
    clock = Clock()
    a, b = two_workers(tmp_path, clock)
    for port in range(6000, 6003):  # three connections on a, which then go quiet
        a.should_close(("127.0.0.1", port))
    b.should_close(("127.0.0.1", 7000))
    clock.now += 5  # longer than the window: only the connection still talking counts
    assert a.should_close(("127.0.0.1", 6000)) is False and a.published == 1
    assert a.shed <= 1


def test_one_worker_alone_never_sheds(tmp_path):
    clock = Clock()
    alone = ConnectionBalancer(SlotTable(create_slot_file(tmp_path / "slots", 1)), clock=clock)
    for i in range(100):
        clock.now += 0.1
        assert alone.should_close(("127.0.0.1", 8000 + i % 7)) is False


def test_a_dead_workers_stale_count_never_triggers_shedding(tmp_path):
    clock = Clock()
    path = create_slot_file(tmp_path / "slots", 2)
    dead = subprocess.Popen(["true"])
    dead.wait()
    SlotTable(path, pid=dead.pid)  # count 0, pid gone
    a = ConnectionBalancer(SlotTable(path), clock=clock)
    for i in range(20):
        clock.now += 0.1
        assert a.should_close(("127.0.0.1", 9000 + i % 4)) is False


def _post(conn: http.client.HTTPConnection) -> bool:
    """One request on a keep-alive connection; True when the server asked to close it."""
    conn.request("POST", "/api/match", body=json.dumps({"upper": UPPER}), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, body
    return (resp.getheader("connection") or "").lower() == "close"


@pytest.mark.integration
def test_four_keepalive_connections_end_up_two_per_worker(tmp_path, tiny_model_dir):
    port = free_port()
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--model", str(tiny_model_dir), "--workers", "2"],
                            cwd=tmp_path, env={**os.environ, "COUPLET_HOME": str(tmp_path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    conns: list[http.client.HTTPConnection] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                probe = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                probe.request("GET", "/healthz")
                probe.getresponse().read()
                probe.close()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        workers = descendants(proc.pid)
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(4)]
        for c in conns:
            c.connect()  # all four at once, before any request: the case that lands them on one worker
        split, shed, deadline = [], 0, time.monotonic() + 60
        while time.monotonic() < deadline:
            for c in conns:
                if _post(c):
                    shed += 1
                    c.close()  # http.client reconnects on the next request
            for c in conns:
                if c.sock is None:
                    c.connect()
            split = sorted(n for n in accepted_connections(workers, port).values() if n)
            if split == [2, 2]:
                break
        assert split == [2, 2], f"connections per worker: {split} after {shed} shed"
        # balanced: it stays so, with no more connections closed
        for _ in range(30):
            assert not any(_post(c) for c in conns)
        assert sorted(n for n in accepted_connections(workers, port).values() if n) == [2, 2]
    finally:
        for c in conns:
            c.close()
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)
