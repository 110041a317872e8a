"""A full state disk (a real tmpfs filled to the last byte): the coordinator says so, waits with
the round it could not save in memory, announces nothing meanwhile, and goes on once there is
space, with every round saved and every event written (none dropped while the disk was full)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import threading
from pathlib import Path

import pytest

from neurofed.coordinator.state import StateStore
from neurofed.launch.local import read_events, wait_for
from neurofed.wire.memory import MemoryHub
from tests.coordinator.helpers import ShiftTrainer, finish, make_coordinator, run_in_thread, start_agent

SITES = ("site-a", "site-b", "site-c")


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs (needs root and mount); unmounted after the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write zeros to ``folder/filler`` until the file system refuses another byte."""
    path = folder / "filler"
    with open(path, "wb", buffering=0) as fh:
        for size in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return path


def test_a_full_state_disk_holds_the_round_until_there_is_space_and_loses_nothing(
    small_disk, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="neurofed.coordinator")
    state = small_disk / "coord"
    first = MemoryHub("testfed")
    stop = threading.Event()
    for s in SITES:
        start_agent(first, s, ShiftTrainer(shift=1.0, num_train_cases=2), tmp_path / "first", stop)
    finish(*run_in_thread(make_coordinator(first, state, SITES, rounds=1, final_eval=False)), stop)
    assert StateStore(state).load().round == 1

    filler = fill(small_disk)
    # the same state given a second round (agents of their own: the first ones saw the end)
    hub, stop = MemoryHub("testfed"), threading.Event()
    for s in SITES:
        start_agent(hub, s, ShiftTrainer(shift=1.0, num_train_cases=2), tmp_path / "second", stop)
    second = make_coordinator(hub, state, SITES, rounds=2, final_eval=False)
    t, box = run_in_thread(second)
    wait_for(
        lambda: "state disk full: cannot save round 2" in caplog.text or not t.is_alive(), 30, "the message"
    )
    assert t.is_alive() and "error" not in box, "the coordinator must wait, not fail"
    assert StateStore(state).load().round == 1, "round 1 stays saved and whole"
    filler.unlink()
    finish(t, box, stop)
    assert "state disk has space again: round 2 saved" in caplog.text
    assert StateStore(state).load().round == 2
    lines = (state / "events.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines), "a write cut short by the full disk left half a line"
    events = read_events(state)
    # every update of round 2 (taken while the disk was full) and the round itself are recorded
    assert sorted(e["site"] for e in events if e["event"] == "update" and e["round"] == 2) == list(SITES)
    assert [e["round"] for e in events if e["event"] == "round"] == [1, 2]
