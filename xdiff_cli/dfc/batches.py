"""The training data stream: activation sources and shuffled batches read in data lanes.

Input: an *activation source* (`ActivationStore.split(...)`, a remote store's split, or
`InMemorySource`): `n_tokens`, `d_a`, `d_b`, `scale_a`, `scale_b`, `num_shards`,
`load_shard(i)` → `.acts_a`, `.acts_b` raw tensors, and `shard_tokens(i)` (metadata) when it
can. Output: `ShuffledBatches.next()`, the next batch of normalised activations, a pure
function of (seed, lane positions), so a resumed run sees exactly the batches an
uninterrupted one would.

Lanes: the training split is cut into L lanes (8 by default), lane l owning the shards
s ≡ l (mod L); a batch is the lanes' rows in lane order. One process reads all of them; a
data-parallel rank reads only its own (`distributed.py`), i.e. disjoint shards, and gets
exactly its rows of the batch one process would cut. A checkpoint records every lane's
position, so a run resumes under any world size that divides L.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from xdiff_cli.errors import XdiffError

# ---------------------------------------------------------------------------------------
# Activation sources
# ---------------------------------------------------------------------------------------


@dataclass
class MemoryShard:
    acts_a: torch.Tensor
    acts_b: torch.Tensor


class InMemorySource:
    """The activation-source protocol over two in-memory tensors, cut into shards."""

    def __init__(
        self,
        acts_a: torch.Tensor,
        acts_b: torch.Tensor,
        shard_size: int = 16_384,
        scale_a: float = 1.0,
        scale_b: float = 1.0,
    ) -> None:
        if acts_a.shape[0] != acts_b.shape[0]:
            raise ValueError("acts_a and acts_b must hold the same number of tokens")
        self.acts_a, self.acts_b = acts_a, acts_b
        self.shard_size = shard_size
        self.scale_a, self.scale_b = float(scale_a), float(scale_b)

    @property
    def n_tokens(self) -> int:
        return self.acts_a.shape[0]

    @property
    def d_a(self) -> int:
        return self.acts_a.shape[1]

    @property
    def d_b(self) -> int:
        return self.acts_b.shape[1]

    @property
    def num_shards(self) -> int:
        return math.ceil(self.n_tokens / self.shard_size)

    def shard_tokens(self, i: int) -> int:
        return max(0, min(self.shard_size, self.n_tokens - i * self.shard_size))

    def load_shard(self, i: int) -> MemoryShard:
        rows = slice(i * self.shard_size, (i + 1) * self.shard_size)
        return MemoryShard(self.acts_a[rows], self.acts_b[rows])


@dataclass
class DataPosition:
    """Where one lane of `ShuffledBatches` is: the buffer starting at shard `shard_pos` of
    the lane's order for epoch `epoch`, and how many batches of it were already used."""

    epoch: int = 0
    shard_pos: int = 0
    batch_in_buffer: int = 0


# A new run splits its data into this many lanes when the shards and the batch allow it
# (`lane_count`), so it can later resume under 1, 2, 4 or 8 ranks.
DATA_LANES = 8


def _shard_tokens(source) -> list[int]:  # noqa: ANN001
    """Tokens per shard, from the source's metadata (no shard is read)."""
    sizes = getattr(source, "shard_tokens", None)
    if sizes is not None:
        return [sizes(i) for i in range(source.num_shards)]
    mean = source.n_tokens / source.num_shards
    return [int(mean)] * source.num_shards


def lane_shards(num_shards: int, lane: int, lanes: int) -> list[int]:
    """The shards a lane owns: every `lanes`-th one (harvest order spreads documents evenly)."""
    return list(range(lane, num_shards, lanes))


def lane_tokens(tokens: list[int], lane: int, lanes: int) -> int:
    """Tokens a lane owns, from the per-shard counts `tokens`."""
    return sum(tokens[s] for s in lane_shards(len(tokens), lane, lanes))


def lane_count(source, batch_size: int, world: int = 1, wanted: int | None = None) -> int:  # noqa: ANN001
    """How many lanes the data stream of a new run has.

    The most lanes among the divisors of lcm(DATA_LANES, world) (or of `wanted`) that are a
    multiple of `world` (each rank gets whole lanes), divide the batch, and leave every lane
    at least one lane-batch of tokens. Raises when no count suits `world` ranks."""
    target = wanted or math.lcm(DATA_LANES, world)
    tokens = _shard_tokens(source)
    for lanes in range(target, 0, -1):
        if target % lanes or lanes % world or batch_size % lanes or lanes > source.num_shards:
            continue
        if min(lane_tokens(tokens, lane, lanes) for lane in range(lanes)) >= batch_size // lanes:
            return lanes
    if batch_size % world:
        raise XdiffError(f"--batch-size {batch_size} does not split evenly over {world} ranks", f"use a multiple of {world}")
    raise XdiffError(
        f"the training split's {source.num_shards} shards cannot give each of {world} ranks its own shards"
        + (f" in {wanted} lanes" if wanted else ""),
        "train with fewer ranks, or harvest more tokens (a store has about one shard per 10% of its tokens, up to 65,536 tokens each)",
    )


class _Lane:
    """One lane: its own shards, visited in a seeded order each epoch through a shuffle buffer."""

    def __init__(self, source, lane: int, lanes: int, batch: int, seed: int, device, buffer_tokens: int,  # noqa: ANN001
                 tokens: int) -> None:
        self.source, self.lane, self.lanes, self.batch = source, lane, lanes, batch
        self.seed, self.device, self.buffer_tokens = seed, device, max(buffer_tokens, batch)
        self.shards = set(lane_shards(source.num_shards, lane, lanes))
        self.mean_shard = tokens / len(self.shards)  # `tokens`: the lane's, from the manifest
        self.position = DataPosition()
        self._buffer: tuple[torch.Tensor, torch.Tensor] | None = None
        self._perm: torch.Tensor | None = None
        self._next_shard_pos = 0

    def order(self, epoch: int) -> list[int]:
        """This epoch's shard order: the lane's shards as they come in the epoch's permutation
        of all shards (with one lane, that permutation itself)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.source.num_shards)
        return [int(s) for s in perm if int(s) in self.shards]

    def _buffer_perm(self, n: int) -> np.ndarray:
        pos = self.position
        key = [self.seed, pos.epoch, pos.shard_pos] + ([self.lane] if self.lanes > 1 else [])
        return np.random.default_rng(key).permutation(n)

    def _load_buffer(self) -> None:
        """Fill the buffer that starts at `self.position` (epoch, shard_pos)."""
        order = self.order(self.position.epoch)
        parts_a, parts_b, rows, i = [], [], 0, self.position.shard_pos
        prefetch = getattr(self.source, "prefetch", None)  # a remote store reads ahead (data/remote.py)
        while i < len(order):
            if prefetch is not None and i + 1 < len(order):
                prefetch(order[i + 1])
            shard = self.source.load_shard(order[i])
            parts_a.append(shard.acts_a)
            parts_b.append(shard.acts_b)
            rows += shard.acts_a.shape[0]
            i += 1
            # Stop once the buffer is big enough, unless what is left of the epoch (estimated
            # from the mean shard size, so it depends on the position only) cannot fill a batch.
            if rows >= self.buffer_tokens and (len(order) - i) * self.mean_shard >= self.batch:
                break
        # The buffer stays in host memory, in the store's dtype (bf16/fp16: half the memory),
        # and is never permuted whole: each batch is gathered through the permutation. A lane
        # holds at least one whole shard, so 8 lanes of 65k-token shards hold 0.5M tokens
        # (8.6 GB for two 4096-wide models): host RAM, not GPU memory beside the crosscoder.
        acts_a, acts_b = torch.cat(parts_a), torch.cat(parts_b)
        self._perm = torch.from_numpy(self._buffer_perm(acts_a.shape[0])).to(acts_a.device)
        self._buffer = (acts_a, acts_b)
        self._next_shard_pos = i

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The lane's next `batch` raw rows (in host memory)."""
        if self._buffer is None:
            self._load_buffer()
        buf_a, buf_b = self._buffer
        start = self.position.batch_in_buffer * self.batch
        if start + self.batch > buf_a.shape[0]:
            # Buffer used up (its short tail is dropped): the next one, or the next epoch.
            if self._next_shard_pos >= len(self.shards):
                self.position = DataPosition(self.position.epoch + 1, 0, 0)
            else:
                self.position = DataPosition(self.position.epoch, self._next_shard_pos, 0)
            self._buffer = None
            return self.next()
        self.position = dataclasses.replace(self.position, batch_in_buffer=self.position.batch_in_buffer + 1)
        rows = self._perm[start : start + self.batch]
        return buf_a[rows], buf_b[rows]

    def seek(self, position: DataPosition) -> None:
        self.position = position
        self._buffer = None


class ShuffledBatches:
    """Deterministic shuffled batches of normalised activations, read in lanes.

    The data is split into `lanes` lanes, each owning every lanes-th shard; each lane visits
    its shards in a seeded order per epoch, concatenates them into a shuffle buffer of at
    least `buffer_tokens / lanes` rows, permutes it (seeded by the position) and cuts
    `batch_size / lanes` rows per step, dropping a short tail. A batch is the lanes' rows in
    lane order. Everything depends only on the seed and the lanes' positions, so those alone
    resume the stream exactly.

    Lanes are what let data-parallel ranks read disjoint shards (`distributed.py`): a rank
    reads only `own` lanes and gets exactly its rows of the batch one process would see, and
    the lane count (not the world size) is what a checkpoint records, so a run resumes under
    any world size that divides it."""

    def __init__(
        self, source, batch_size: int, seed: int, device: torch.device, buffer_tokens: int = 262_144, normalise=None,
        lanes: int | None = None, own: range | None = None, prefetch: bool | None = None,
    ):  # noqa: ANN001 - normalise: (raw_a, raw_b) -> normalised float32 pair; default: × the source's scales
        if source.n_tokens < batch_size:
            raise XdiffError(
                f"the activation store holds {source.n_tokens} tokens, fewer than one batch ({batch_size})",
                "harvest more tokens (--tokens) or lower --batch-size",
            )
        if device.type == "cuda" and device.index is None:  # the prefetch thread has its own current device
            device = torch.device("cuda", torch.cuda.current_device())
        self.source, self.batch_size, self.seed, self.device = source, batch_size, seed, device
        self.normalise = normalise or (lambda a, b: (a.float() * source.scale_a, b.float() * source.scale_b))
        self.buffer_tokens = buffer_tokens
        self.lanes = lanes or lane_count(source, batch_size)
        if batch_size % self.lanes:
            raise XdiffError(f"--batch-size {batch_size} does not split into {self.lanes} data lanes", f"use a multiple of {self.lanes}")
        self.own = own if own is not None else range(self.lanes)
        per_lane = batch_size // self.lanes
        shard_tokens = _shard_tokens(source)
        tokens = {lane: lane_tokens(shard_tokens, lane, self.lanes) for lane in self.own}
        for lane in self.own:
            if tokens[lane] < per_lane:
                raise XdiffError(
                    f"data lane {lane} of {self.lanes} holds fewer than one lane-batch ({per_lane} tokens) of the "
                    f"{source.num_shards}-shard training split",
                    "train in a new run (its lanes fit this store), or harvest more tokens",
                )
        self._lanes = {
            lane: _Lane(source, lane, self.lanes, per_lane, seed, device, buffer_tokens // self.lanes, tokens[lane])
            for lane in self.own
        }
        # On a GPU the next batch is gathered and copied in a background thread while the
        # current step runs; elsewhere there is nothing to overlap with.
        self.prefetch = device.type == "cuda" if prefetch is None else prefetch
        self._worker: ThreadPoolExecutor | None = None
        self._ahead: Future | None = None
        self._consumed = self._lane_positions()  # the positions after the last batch handed out

    def _lane_positions(self) -> dict[int, DataPosition]:
        return {lane: dataclasses.replace(stream.position) for lane, stream in self._lanes.items()}

    def _cut(self) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[int, DataPosition]]:
        """The next raw batch on the device, and the lanes' positions after it."""
        rows = [lane.next() for lane in self._lanes.values()]
        a = rows[0][0] if len(rows) == 1 else torch.cat([a for a, _ in rows])
        b = rows[0][1] if len(rows) == 1 else torch.cat([b for _, b in rows])
        return (a.to(self.device, non_blocking=True), b.to(self.device, non_blocking=True)), self._lane_positions()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch (this process's lanes' rows of it, normalised)."""
        if not self.prefetch:
            batch, self._consumed = self._cut()
            return self.normalise(*batch)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xdiff-batches")
        ahead = self._ahead or self._worker.submit(self._cut)
        batch, self._consumed = ahead.result()
        self._ahead = self._worker.submit(self._cut)
        return self.normalise(*batch)

    @property
    def positions(self) -> dict[int, DataPosition]:
        """Each own lane's position after the last batch handed out (a copy)."""
        return {lane: dataclasses.replace(p) for lane, p in self._consumed.items()}

    def seek(self, positions: dict[int, DataPosition]) -> None:
        self._drop_ahead()
        for lane, stream in self._lanes.items():
            stream.seek(positions[lane])
        self._consumed = self._lane_positions()

    def _drop_ahead(self) -> None:
        """Forget a batch prepared ahead (the lanes are re-positioned after this)."""
        if self._ahead is not None:
            self._ahead.cancel()
            try:
                self._ahead.result()
            except Exception:  # noqa: BLE001 - an error in a batch nobody will use is not one
                pass
            self._ahead = None

    def relaid(self, lanes: int | None = None, own: range | None = None) -> ShuffledBatches:
        """The same source, seed and settings in `lanes` lanes (default: these) of which `own`
        are read (default: all), at the start of the stream."""
        return ShuffledBatches(
            self.source, self.batch_size, self.seed, self.device, self.buffer_tokens, self.normalise,
            lanes or self.lanes, own, self.prefetch,
        )

    def for_lanes(self, own: range) -> ShuffledBatches:
        """The same stream restricted to the lanes `own` (a rank's), at their current positions."""
        part = self.relaid(own=own)
        part.seek(self.positions)
        return part
