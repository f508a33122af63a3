"""Sharded harvest: each process harvests one part of the corpus; a merge joins the parts.

Input: `Part(i, N)` (from `--shard i/N`, or RANK/WORLD_SIZE under torchrun) and the same
harvest settings in every process. Output: `activations/parts/part-0000i-of-0000N/` (a
store of its own, resumable like a single-process one), and after `merge_parts` the usual
`activations/` store that training and analysis read.

The split is by *harvest batch*: documents are cut into blocks of `batch_size` consecutive
documents (block = doc_id // batch_size) and block b goes to part b mod N. A part's forward
passes therefore see exactly the batches a single process would, so the batch-median
outlier filter drops the same pairs and every stored pair is bit-identical to the
single-process harvest of the same documents. Each part stops at its share of `--tokens`
(N shares differing by at most one token).

The normalisation scales are computed at merge time from the first `SCALE_SAMPLE_TOKENS`
pairs in global document order, gathered from each part's own first pairs
(`scale_sample.safetensors`: their norms and doc ids), which is the sample a single process
uses. Merging links (or copies) the parts' shard files into `activations/shards/` in
document order, merges the documents, and writes the manifest last, so an interrupted merge
is redone from scratch and a merged store never names a missing shard.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdiff_cli.atomic import atomic_path, carry_recorded_sum, read_json, recorded_sum, write_json
from xdiff_cli.data.store import DOCUMENTS, IDENTITY_FIELDS, MANIFEST, SHARDS_DIR, ActivationStore, shard_name
from xdiff_cli.errors import XdiffError

PARTS_DIR = "parts"
SCALE_SAMPLE = "scale_sample.safetensors"
_PART_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Part:
    """Part `index` (0-based) of `count`."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Part:
        """`"i/N"` with 0 ≤ i < N; anything else is a one-line user error."""
        match = _PART_RE.match(text or "")
        if not match:
            raise XdiffError(f"--shard must look like I/N (e.g. 0/4), got {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise XdiffError(f"--shard {text}: need N ≥ 1 and 0 ≤ I < N (parts are numbered from 0)")
        return cls(index, count)

    @property
    def spec(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def dirname(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def owns(self, doc_id: int, batch_size: int) -> bool:
        return (doc_id // batch_size) % self.count == self.index

    def quota(self, tokens: int) -> int:
        """This part's share of `tokens` (the shares sum to `tokens`)."""
        return tokens // self.count + (1 if self.index < tokens % self.count else 0)


def part_dir(store_dir: Path | str, part: Part) -> Path:
    return Path(store_dir) / PARTS_DIR / part.dirname


# --- one part ------------------------------------------------------------------------------


def write_scale_sample(part_store: Path, manifest: dict[str, Any], sample_tokens: int) -> None:
    """Norms and doc ids of the part's first `sample_tokens` pairs (its share of the scale sample)."""
    import torch
    from safetensors.torch import save_file

    from xdiff_cli.data.store import load_shard_file

    norm_a, norm_b, doc_id, seen = [], [], [], 0
    for entry in manifest["shards"]:
        if seen >= sample_tokens:
            break
        shard = load_shard_file(part_store / SHARDS_DIR / entry["name"])
        norm_a.append(shard.acts_a.float().norm(dim=-1))
        norm_b.append(shard.acts_b.float().norm(dim=-1))
        doc_id.append(shard.doc_id)
        seen += len(shard)
    empty = torch.zeros(0)
    tensors = {
        "norm_a": torch.cat(norm_a)[:sample_tokens] if norm_a else empty,
        "norm_b": torch.cat(norm_b)[:sample_tokens] if norm_b else empty,
        "doc_id": torch.cat(doc_id)[:sample_tokens] if doc_id else empty.long(),
    }
    with atomic_path(part_store / SCALE_SAMPLE) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


# --- merge ---------------------------------------------------------------------------------


def _read_parts(store_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    root = store_dir / PARTS_DIR
    found = sorted(p for p in root.glob("part-*") if (p / MANIFEST).is_file()) if root.is_dir() else []
    if not found:
        raise XdiffError(f"no harvested parts in {root}", "harvest them first: xdiff harvest ... --shard I/N")
    return [(p, read_json(p / MANIFEST, "part manifest")) for p in found]


def check_parts(store_dir: Path, parts: list[tuple[Path, dict[str, Any]]]) -> int:
    """Refuse to merge parts that are incomplete, missing, duplicated or differently harvested.

    Returns the number of parts."""
    specs = [m.get("part") for _, m in parts]
    counts = sorted({int(str(s).split("/")[1]) for s in specs if s})
    if len(counts) != 1 or None in specs:
        raise XdiffError(
            f"the parts in {store_dir / PARTS_DIR} were split different ways ({', '.join(map(str, specs))})",
            "delete the stray parts and harvest every I/N with the same N",
        )
    count = counts[0]
    missing = sorted(set(range(count)) - {int(str(s).split("/")[0]) for s in specs})
    if missing:
        raise XdiffError(
            f"cannot merge: part {missing[0]}/{count} is missing ({len(missing)} of {count} missing)",
            f"run xdiff harvest --run RUN --shard {missing[0]}/{count}",
        )
    first = parts[0][1]
    for _, manifest in parts:
        if not manifest.get("complete"):
            raise XdiffError(
                f"cannot merge: part {manifest['part']} is incomplete (interrupted)",
                f"rerun xdiff harvest --run RUN --shard {manifest['part']} to finish it",
            )
        wrong = [k for k in (*IDENTITY_FIELDS, "part_block_docs") if manifest.get(k) != first.get(k)]
        if wrong:
            details = ", ".join(f"{k}: {manifest.get(k)!r} vs {first.get(k)!r}" for k in wrong)
            raise XdiffError(
                f"cannot merge: part {manifest['part']} was harvested with other settings than part "
                f"{first['part']} ({details})",
                "harvest every part with the same models, corpus and settings",
            )
    return count


def _document_lines(part_store: Path, manifest: dict[str, Any]) -> Iterator[tuple[int, bytes]]:
    with (part_store / DOCUMENTS).open("rb") as fh:
        remaining = int(manifest["documents_bytes"])
        for line in fh:
            if remaining <= 0:
                break
            remaining -= len(line)
            yield json.loads(line)["doc_id"], line


def merged_scales(parts: list[tuple[Path, dict[str, Any]]], d_a: int, d_b: int, sample_tokens: int) -> tuple[float, float]:
    """The single-process scale sample: the first `sample_tokens` pairs in document order."""
    import torch
    from safetensors.torch import load_file

    from xdiff_cli.data.harvest import normalisation_scale

    samples = [load_file(str(path / SCALE_SAMPLE)) for path, _ in parts]
    doc_id = torch.cat([s["doc_id"] for s in samples])
    # A document lives in one part and its pairs are in order there: a stable sort by doc id
    # puts the pairs in global document order.
    order = torch.sort(doc_id, stable=True).indices[:sample_tokens]
    norm_a = torch.cat([s["norm_a"] for s in samples])[order]
    norm_b = torch.cat([s["norm_b"] for s in samples])[order]
    return normalisation_scale(norm_a, d_a, d_b), normalisation_scale(norm_b, d_a, d_b)


def _link_or_copy(source: Path, target: Path) -> None:
    """Link (or copy) a part's shard into the merged store, with the checksum recorded when
    the part wrote it, so the integrity checks of the merged store cover the shard's bytes."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)  # no extra disk on one filesystem
    except OSError:
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
    carry_recorded_sum(source, target)


def merge_parts(store_dir: Path | str, *, eval_fraction: float) -> ActivationStore:
    """Join `store_dir/parts/*` into the store at `store_dir` (idempotent; redone if interrupted)."""
    from xdiff_cli.data.harvest import SCALE_SAMPLE_TOKENS, _aligned_fraction

    store_dir = Path(store_dir)
    if (store_dir / MANIFEST).is_file():
        existing = read_json(store_dir / MANIFEST, "activation store manifest")
        if existing.get("complete"):
            return ActivationStore.open(store_dir)
    parts = _read_parts(store_dir)
    count = check_parts(store_dir, parts)
    first = parts[0][1]
    shards = sorted(
        ((entry, path) for path, manifest in parts for entry in manifest["shards"]),
        key=lambda item: item[0]["first_doc_id"],
    )
    if len(shards) < 2:
        raise XdiffError(
            f"the parts hold only {sum(e['n_tokens'] for e, _ in shards)} aligned tokens ({len(shards)} shard)",
            "use a larger corpus (or more --tokens) so there are train and eval shards",
        )
    (store_dir / MANIFEST).unlink(missing_ok=True)  # an unfinished merge: start over
    shards_dir = store_dir / SHARDS_DIR
    shutil.rmtree(shards_dir, ignore_errors=True)
    shards_dir.mkdir(parents=True)
    entries = []
    for index, (entry, path) in enumerate(shards):
        _link_or_copy(path / SHARDS_DIR / entry["name"], shards_dir / shard_name(index))
        entries.append({**entry, "name": shard_name(index)})
    with atomic_path(store_dir / DOCUMENTS) as tmp, tmp.open("wb") as out:
        streams = [_document_lines(path, manifest) for path, manifest in parts]
        for _, line in heapq.merge(*streams, key=lambda item: item[0]):
            out.write(line)
    stats: dict[str, float] = {}
    for _, manifest in parts:
        for key, value in manifest["stats"].items():
            stats[key] = stats.get(key, 0) + value
    scale_a, scale_b = merged_scales(parts, first["d_a"], first["d_b"], SCALE_SAMPLE_TOKENS)
    n_eval = min(len(entries) - 1, max(1, round(len(entries) * eval_fraction)))
    manifest = {
        "format_version": first["format_version"],
        **{key: first[key] for key in IDENTITY_FIELDS if key in first},
        "aligned_fraction": _aligned_fraction(stats),
        "scale_a": scale_a,
        "scale_b": scale_b,
        "n_tokens": sum(e["n_tokens"] for e in entries),
        "shards": entries,
        "eval_start_shard": len(entries) - n_eval,
        "complete": True,
        "documents_bytes": (store_dir / DOCUMENTS).stat().st_size,
        "documents_crc32": (recorded_sum(store_dir / DOCUMENTS) or {}).get("crc32"),
        "next_doc_index": max(m["next_doc_index"] for _, m in parts),
        "stats": stats,
        "shard_tokens": first.get("shard_tokens"),
        "merged_parts": count,
    }
    write_json(store_dir / MANIFEST, manifest)
    return ActivationStore.open(store_dir)
