"""Data-parallel use: 2 ranks under ``torchrun`` (CPU, gloo) shard the files disjointly and train in step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")


def test_two_torchrun_ranks_get_disjoint_covering_shards(many_images: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    worker = Path(__file__).with_name("dist_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(worker), str(many_images), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["shard_id"], r["num_shards"]) for r in ranks] == [(0, 2), (1, 2)]
    n = len(ranks[0]["files"])
    for epoch in (0, 1):
        a, b = (set(r["epochs"][epoch]) for r in ranks)
        assert len(a) == len(ranks[0]["epochs"][epoch]) and len(b) == len(ranks[1]["epochs"][epoch])
        assert not a & b, f"epoch {epoch}: ranks share files {sorted(a & b)}"
        assert a | b == set(range(n)), f"epoch {epoch}: files {sorted(set(range(n)) - (a | b))} not covered"
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # a new order each epoch
    assert ranks[0]["steps"] == ranks[1]["steps"] == 12
    assert ranks[0]["weights_checksum"] == pytest.approx(ranks[1]["weights_checksum"])  # same averaged steps
