"""A training run that records which shards each process read: run it alone or under torchrun.

    python tests/dist_train_worker.py OUT_DIR            # one process
    torchrun --nproc-per-node 2 tests/dist_train_worker.py OUT_DIR

Used by tests/test_scaleout.py; it resumes from OUT_DIR's checkpoints like any training run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from xdiff_cli.dfc import distributed
from xdiff_cli.dfc.crosscoder import CrosscoderConfig
from xdiff_cli.dfc.training import InMemorySource, TrainConfig, train

CC = CrosscoderConfig(d_a=10, d_b=14, dict_size=64, k=4, exclusive_frac=0.1)
TC = TrainConfig(steps=12, batch_size=64, lr=3e-3, device="cpu", checkpoint_every=6, log_every=6, warmup_steps=3,
                 k_anneal_steps=4, dead_window_tokens=128, buffer_tokens=512,
                 normalisation="store")  # "centred" has rank 0 read a sample of all shards first


class RecordingSource(InMemorySource):
    """Planted activations in 24 shards of 100 tokens; remembers the shards it loaded."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        z = torch.relu(torch.randn(2400, 24, generator=g)) * (torch.rand(2400, 24, generator=g) < 0.25)
        super().__init__(z @ torch.randn(24, 10, generator=g), z @ torch.randn(24, 14, generator=g), shard_size=100)
        self.read: set[int] = set()

    def load_shard(self, i: int):  # noqa: ANN201
        self.read.add(i)
        return super().load_shard(i)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    d = distributed.init_from_env(cuda=False)
    source = RecordingSource()
    train(source, CC, TC, out, progress=False)
    rank = d.rank if d else 0
    (out / f"read-by-rank-{rank}.json").write_text(json.dumps(sorted(source.read)))
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
