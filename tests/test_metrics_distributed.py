"""Metric work split over two real gloo ranks (spawned processes, file rendezvous): every reduction gives what
one process computes from all the samples, and a failure on one rank reaches both."""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline import process_group
from pipeline.metrics import (
    Collective,
    FeatureStats,
    InceptionScoreStats,
    RankFailed,
    evaluate_generator,
    inception_score,
    precision_recall,
)
from pipeline.metrics.collective import node_threads
from tests.test_metrics import PooledPixels, ToyGenerator, generator_reference

ROWS = np.random.default_rng(0).normal(size=(20, 5)) + 100.0  # a large common offset: cancellation-prone
LOGITS = np.random.default_rng(1).normal(size=(23, 7)) * 3
REAL = np.random.default_rng(2).normal(size=(40, 6))
FAKE = np.random.default_rng(3).normal(size=(40, 6)) * 0.7 + 0.3
EVAL = dict(num_classes=4, dim_z=16, num_samples=61, batch_size=16, device="cpu", seed=3, pr_samples=50)


def _on_two_ranks(rank: int, rendezvous: str, ref_path: str, out: str) -> None:
    torch.set_num_threads(1)  # a spawned process: conftest's session fixture does not reach it
    os.environ["LOCAL_WORLD_SIZE"] = "2"  # both ranks on this node, as Ray Train and torchrun say so
    process_group.join("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    group = Collective(rank, 2)
    got: dict = {}

    lo, hi = group.share(len(ROWS))
    stats = FeatureStats()
    for start in range(lo, hi, 4):  # several batches, so each rank's own centre is its first batch's mean
        stats.update(ROWS[start:min(start + 4, hi)])
    merged = stats.all_reduce(group)
    got["mean"], got["cov"], got["count"] = merged.mean.tolist(), merged.cov.tolist(), merged.count
    lonely = FeatureStats()  # rank 1 holds no rows at all
    if rank == 0:
        lonely.update(ROWS[:5])
    lonely = lonely.all_reduce(group)
    got["lonely_mean"], got["lonely_count"] = lonely.mean.tolist(), lonely.count

    is_stats = InceptionScoreStats(len(LOGITS), splits=5)
    lo, hi = group.share(len(LOGITS))
    is_stats.update(LOGITS[lo:hi], start=lo)
    got["is"] = is_stats.all_reduce(group).score()

    rows = np.arange(6 * rank, dtype=np.float32).reshape(-1, 2) if rank else np.zeros((0, 2), np.float32)
    got["gathered"] = group.gather_rows(rows).tolist()
    got["pr"] = precision_recall(REAL, FAKE, group=group)
    got["broadcast"] = group.broadcast({"from": rank, "array": np.arange(3)} if rank == 0 else None)["from"]

    try:
        group.raise_if_failed(ValueError("no luck on this rank") if rank == 1 else None)
    except RankFailed as err:
        got["failure"] = str(err)

    ran: list[int] = []
    got["rank0_threads"] = group.on_rank0(lambda: ran.append(rank) or torch.get_num_threads())
    got["ran"], got["threads_after"] = ran, torch.get_num_threads()
    try:
        group.on_rank0(lambda: 1 / 0)
    except RankFailed as err:
        got["rank0_failure"] = str(err)

    G, ex = ToyGenerator(), PooledPixels()
    with open(ref_path, "rb") as f:
        ref, weights = pickle.load(f)
    G.load_state_dict(weights)  # the parent's G (its class embedding is drawn from the global RNG)
    got["eval"] = evaluate_generator(G, extractor=ex, ref_stats=ref, group=group, **EVAL)
    with torch.no_grad():  # rank 1's images turn non-finite: both ranks report NaN
        if rank == 1:
            G.proj.fill_(float("nan"))
    got["nan_eval"] = evaluate_generator(G, extractor=ex, ref_stats=ref, group=group, **EVAL)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(got, f)
    process_group.leave()


def test_two_ranks_reduce_to_what_one_process_computes(tmp_path):
    G = ToyGenerator()
    ref = generator_reference(G, 300, seed=11, ex=PooledPixels(), tmp_path=tmp_path)
    ref_path = tmp_path / "ref.pkl"
    ref_path.write_bytes(pickle.dumps((ref, G.state_dict())))
    out = str(tmp_path / "got")
    mp.spawn(_on_two_ranks, args=(str(tmp_path / "pg"), str(ref_path), out), nprocs=2, join=True)
    ranks = []
    for rank in (0, 1):
        with open(f"{out}.{rank}") as f:
            ranks.append(json.load(f))
    one = evaluate_generator(G, extractor=PooledPixels(), ref_stats=ref, **EVAL)
    assert set(one) == {"fid", "is_mean", "is_std", "precision_pooled", "recall_pooled"}

    for got in ranks:
        np.testing.assert_allclose(got["mean"], ROWS.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(got["cov"], np.cov(ROWS, rowvar=False), rtol=1e-9, atol=1e-12)
        assert got["count"] == 20 and got["lonely_count"] == 5
        np.testing.assert_allclose(got["lonely_mean"], ROWS[:5].mean(axis=0), rtol=1e-12)
        assert got["is"] == pytest.approx(inception_score(LOGITS, splits=5), rel=1e-12)
        assert got["gathered"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]  # rank 0 had none
        assert tuple(got["pr"]) == precision_recall(REAL, FAKE)
        assert got["broadcast"] == 0
        assert got["failure"] == "rank 1: ValueError: no luck on this rank"
        # work for rank 0 alone: it runs there on both ranks' threads, its result and its failure reach both
        assert got["rank0_threads"] == min(2, len(os.sched_getaffinity(0))) and got["threads_after"] == 1
        assert got["rank0_failure"] == "rank 0: ZeroDivisionError: division by zero"
        # a generator's evaluation over two ranks (31 + 30 samples, batches of 16) = the one-process numbers
        assert got["eval"].keys() == one.keys()
        for key, value in one.items():
            assert got["eval"][key] == pytest.approx(value, rel=1e-7, abs=1e-12), key
        assert got["nan_eval"].keys() == one.keys() and all(math.isnan(v) for v in got["nan_eval"].values())
    assert ranks[0]["eval"] == ranks[1]["eval"]  # bit for bit the same on both ranks
    assert ranks[0]["ran"] == [0] and ranks[1]["ran"] == []


def test_node_threads_borrows_only_the_cpu_threads_of_this_nodes_ranks(monkeypatch):
    cpu, cores, before = torch.device("cpu"), len(os.sched_getaffinity(0)), torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with node_threads(cpu, world_size=2) as n:
        assert n == torch.get_num_threads() == min(2 * before, cores)
    assert torch.get_num_threads() == before
    with node_threads(cpu, world_size=1) as n:  # one process: nobody waits to lend its threads
        assert n == torch.get_num_threads() == before
    with node_threads(torch.device("cuda", 0), world_size=2) as n:  # a GPU rank's host threads stay as they are
        assert n == torch.get_num_threads() == before
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # launched without a node-local count: assume one rank here
    with node_threads(cpu, world_size=2) as n:
        assert n == before


def test_shares_are_contiguous_disjoint_and_cover_every_index():
    for n in (0, 1, 5, 61, 1000):
        for world in (1, 2, 3, 8):
            parts = [Collective(r, world).share(n) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        Collective(2, 2)


def test_inception_score_stats_in_any_order_and_parts_equal_the_whole():
    whole = inception_score(LOGITS, splits=4)
    stats = InceptionScoreStats(len(LOGITS), splits=4)
    for start, stop in ((10, 23), (0, 3), (3, 10)):
        stats.update(LOGITS[start:stop], start=start)
    assert stats.score() == pytest.approx(whole, rel=1e-12)
    with pytest.raises(ValueError, match="needs all 23"):
        InceptionScoreStats(23).score()
    with pytest.raises(ValueError, match="outside"):
        stats.update(LOGITS[:2], start=22)
