"""Failures never hang: a dead or stuck rank makes the others fail with a clear error.

Short limits keep these fast: collectives time out after 2 s, `spawn` gives up after 20 s.
"""

import os
import re
import time

import pytest
import torch

from minillm.parallel import CommStats, SpawnError, SpawnTimeoutError, comm, spawn
from minillm.parallel.pipeline import PipelineStage, run_pipeline
from minillm.parallel.testing import random_batches, tiny_model

COLLECTIVE_TIMEOUT_S = 2.0


def ranks_and_bytes(group) -> tuple[int, int, dict]:
    stats = CommStats()
    x = torch.ones(1000)
    comm.all_reduce(x, group, stats)
    return group.rank(), int(x[0]), stats.as_dict()["bytes_sent"]


def rank_dies_before_all_reduce(group) -> None:
    # One collective that both ranks complete first: the transport is connected, so what
    # rank 0 then meets is a peer gone mid-run (not a failed connection at start-up).
    comm.all_reduce(torch.ones(1), group)
    if group.rank() == 1:
        os._exit(1)  # a crash: no exception, no goodbye
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(4), group)
    finally:
        print(f"rank {group.rank()} failed after {time.monotonic() - start:.1f} s")


def rank_hangs_before_all_reduce(group) -> None:
    if group.rank() == 1:
        time.sleep(60)  # stuck: alive but never calls the collective
    start = time.monotonic()
    try:
        comm.all_reduce(torch.ones(4), group)
    except comm.CollectiveTimeoutError as e:
        raise comm.CollectiveTimeoutError(f"{e} [after {time.monotonic() - start:.1f} s]") from e


def last_stage_dies_mid_pipeline(group) -> None:
    stage = PipelineStage(tiny_model(), group.rank(), group.size())
    if stage.is_last:
        os._exit(1)
    micro = random_batches(2, 2, 8, 256)
    run_pipeline(stage, micro, group, "1f1b")


@pytest.mark.dist
def test_spawn_returns_every_rank_result_in_order():
    results = spawn(ranks_and_bytes, 4)
    assert [r[0] for r in results] == [0, 1, 2, 3]
    assert all(r[1] == 4 for r in results)  # the sum over 4 ranks
    # ring all-reduce: each rank sends 2 (p - 1) / p of the 4000 bytes
    assert results[0][2] == {"all_reduce": 6000}


@pytest.mark.dist
def test_a_rank_that_dies_makes_the_others_fail_clearly():
    start = time.monotonic()
    with pytest.raises(SpawnError) as info:
        spawn(
            rank_dies_before_all_reduce, 2, timeout_s=20, collective_timeout_s=COLLECTIVE_TIMEOUT_S
        )
    assert time.monotonic() - start < 20
    msg = str(info.value)
    assert "rank 1 ---\nprocess exited with code 1" in msg
    assert "CollectiveTimeoutError: rank 0 of 2: all_reduce did not complete" in msg
    assert "a peer rank died" in msg


@pytest.mark.dist
def test_a_rank_that_hangs_makes_the_others_time_out():
    with pytest.raises(SpawnTimeoutError) as info:
        spawn(rank_hangs_before_all_reduce, 2, timeout_s=6, collective_timeout_s=2)
    msg = str(info.value)
    # rank 1 was killed at the deadline; rank 0 had failed with a clear error by then
    assert "ranks [1] of 2 did not finish within 6" in msg
    assert "CollectiveTimeoutError: rank 0 of 2: all_reduce did not complete" in msg
    waited = float(msg.split("[after ")[1].split(" s]")[0])
    assert COLLECTIVE_TIMEOUT_S - 0.5 < waited < COLLECTIVE_TIMEOUT_S + 3


@pytest.mark.dist
def test_a_pipeline_stage_that_dies_fails_its_neighbours_clearly():
    with pytest.raises(SpawnError) as info:
        spawn(last_stage_dies_mid_pipeline, 2, timeout_s=20, collective_timeout_s=2)
    # depending on timing, stage 0 notices in its send of F0 or its receive for B0
    assert re.search(
        r"CollectiveTimeoutError: rank 0 of 2: pipeline[ _](send|recv) did not complete",
        str(info.value),
    )


def test_spawn_rejects_functions_it_cannot_import():
    def local(group):
        return 0

    with pytest.raises(ValueError, match="importable function"):
        spawn(local, 2)
    with pytest.raises(ValueError, match="world_size"):
        spawn(ranks_and_bytes, 0)
