"""The collector threshold is raised only while batches run, and restored after."""

from __future__ import annotations

import gc
import threading

import pytest

from p2psync.store.gcpause import BATCH_THRESHOLD, fewer_collections

pytestmark = pytest.mark.pure


def test_threshold_is_raised_during_a_batch_and_restored_after() -> None:
    before = gc.get_threshold()
    with fewer_collections():
        assert gc.get_threshold()[0] == max(before[0], BATCH_THRESHOLD)
        with fewer_collections():  # nested
            assert gc.get_threshold()[0] == max(before[0], BATCH_THRESHOLD)
        assert gc.get_threshold()[0] == max(before[0], BATCH_THRESHOLD)
    assert gc.get_threshold() == before


def test_concurrent_batches_restore_the_threshold_once_all_end() -> None:
    before = gc.get_threshold()
    inside, release = threading.Barrier(9), threading.Event()

    def batch() -> None:
        with fewer_collections():
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=batch) for _ in range(8)]
    for thread in threads:
        thread.start()
    inside.wait()
    assert gc.get_threshold()[0] == max(before[0], BATCH_THRESHOLD)
    release.set()
    for thread in threads:
        thread.join()
    assert gc.get_threshold() == before


def test_a_disabled_threshold_is_left_alone() -> None:
    before = gc.get_threshold()
    gc.set_threshold(0)
    try:
        with fewer_collections():
            assert gc.get_threshold()[0] == 0
        assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)
