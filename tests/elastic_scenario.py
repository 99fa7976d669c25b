"""One elastic main-path segment on a 3-node local Ray cluster whose size really changes.

Run by ``tests/test_elastic.py`` in its own process (Ray is initialised once per
process, and the session's shared cluster has one node):

    python tests/elastic_scenario.py OUT_DIR

The cluster is real: ``ray.cluster_utils.Cluster`` starts a head node and worker
nodes as separate raylet processes on this machine. Workers reserve 2 CPUs and
each worker node has 3 (one left for Ray Data), so the Train group fits one
worker per worker node. The segment starts elastic (1..2 workers) with one
worker node; a second node joins (the group must grow to 2), then that node is
removed, its raylet and the Train worker on it stopped (the group must shrink
back to 1). Writes ``OUT_DIR/result.json``: the segment's parameters, the curve
path and what the orchestrator did when.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

#: Sizes the test checks against. The model is big enough that a step takes a
#: noticeable time on CPU, so the resizes happen well before the segment ends.
STEPS, G, MICRO, L, VOCAB, EVERY = 120, 16, 4, 128, 512, 5


def _records(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


def _wait(curve: Path, what: str, pred, timeout: float = 240.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        hit = next((r for r in _records(curve) if pred(r)), None)
        if hit is not None:
            return hit
        time.sleep(0.2)
    raise TimeoutError(f"{curve}: no record where {what} within {timeout:.0f} s")


def _starts(curve: Path) -> list[dict]:
    return [r for r in _records(curve) if r.get("event") == "start"]


def orchestrate(cluster, curve: Path, log: list) -> None:
    """Grow once the 1-worker group has checkpointed, shrink once the 2-worker one has."""
    first = _wait(curve, "a 1-worker start", lambda r: r.get("event") == "start")
    _wait(curve, "a step past the first checkpoint", lambda r: r.get("step", 0) >= first["step"] + EVERY + 1
          and "loss" in r)
    node = cluster.add_node(num_cpus=3)
    log.append({"action": "add_node", "time": time.time()})
    grown = _wait(curve, "a 2-worker start", lambda r: r.get("event") == "start" and r["world_size"] == 2)
    _wait(curve, "a 2-worker step past a checkpoint",
          lambda r: r.get("world_size") == 2 and "loss" in r and r["step"] >= grown["step"] + EVERY + 1)
    # The node goes away the way a drained or preempted one does: its raylet
    # shuts down and takes its Train worker with it, and the GCS learns at once
    # (a SIGKILLed raylet is only declared dead after missed heartbeats).
    cluster.remove_node(node, allow_graceful=True)
    log.append({"action": "remove_node", "time": time.time()})


def main(out: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from raypath.config import ModelConfig, TrainConfig
    from raypath.data import _write_blocks
    from raypath.schedules import MainPath
    from raypath.segment import Segment, fit_segment

    # The segment's driver runs as a task on the head node (as raypath's
    # branches do), so this thread is free to add and kill nodes (Ray only
    # allows that from the main thread).
    fit = ray.remote(num_cpus=0, resources={"head": 1}, max_retries=0)(fit_segment)

    # After the node is gone, Ray may first try to restart at the old size
    # (its view of the cluster lags by a few seconds) and waits this long for
    # the missing worker before trying the size that fits (default 60 s).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    rng = np.random.default_rng(0)
    _write_blocks(out / "stream.parquet", rng.integers(1, VOCAB, (STEPS * G, L + 1), dtype=np.int32))
    _write_blocks(out / "val.parquet", rng.integers(1, VOCAB, (8, L + 1), dtype=np.int32))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1}})
    cluster.add_node(num_cpus=3)
    ray.init(address=cluster.address)
    seg = Segment(
        name="elastic", kind="main", version="v1", stream_path=str(out / "stream.parquet"),
        start_step=0, end_step=STEPS, schedule=MainPath(3e-3, 5),
        model=ModelConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=384,
                          max_position_embeddings=L),
        train=TrainConfig(num_workers=2, min_workers=1, max_failures=3, elastic_resize_interval_s=2.0,
                          cpus_per_worker=2.0, global_batch_size=G, micro_batch_size=MICRO, log_every=1,
                          eval_every=0, checkpoint_every=EVERY, warmup_steps=5),
        vocab_size=VOCAB, eos_id=0, pad_id=None, seq_len=L, storage=str(out / "ray" / "elastic"),
        curves_path=str(out / "curve.jsonl"), val_paths={"v1": str(out / "val.parquet")},
        stream_limit=STEPS * G,
    )
    log: list = []
    errors: list = []
    done = fit.remote(seg)
    try:
        orchestrate(cluster, Path(seg.curves_path), log)
    except Exception as e:  # noqa: BLE001 - reported in result.json, checked by the test
        errors.append(repr(e))
    ray.get(done)
    result = {"steps": STEPS, "global_batch": G, "micro_batch": MICRO, "seq_len": L, "every": EVERY,
              "storage": seg.storage, "curve": seg.curves_path, "actions": log, "errors": errors}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
