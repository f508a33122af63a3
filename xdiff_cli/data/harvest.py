"""Harvest stage: run both models over a corpus and store their token-aligned residuals.

Input: two `LoadedModel`s and documents (`corpus.py`). Output: an `ActivationStore`.

Per batch of documents:
1. each model renders (chat template for chats) and tokenizes every document, truncated to
   `context_length`; `alignment.align` pairs the tokens ending at the same character;
2. each model runs only up to the hooked layer (a forward hook grabs the layer output and
   stops the pass, so later layers and the LM head never run), right-padded with masks;
3. the aligned positions are gathered; pairs where either model's norm exceeds 2× the
   batch median (attention sinks, first tokens) are dropped;
4. documents accumulate into a shard; full shards are written atomically with the manifest.

The per-model normalisation scalar (median norm → √((d_a+d_b)/2)) is estimated at the end
from the first stored pairs; activations are stored raw.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xdiff_cli import paths
from xdiff_cli.data.alignment import AlignedPairs, align, token_spans
from xdiff_cli.data.corpus import (
    MESSAGE_SEPARATOR,
    Document,
    canonical_chat_text,
    iter_documents,
    render_document,
)
from xdiff_cli.data.store import DTYPES, ActivationStore, Shard, StoreWriter, estimate_bytes
from xdiff_cli.errors import XdiffError
from xdiff_cli.models.arch import layer_output_tensor

DEFAULT_SHARD_TOKENS = 65_536
MIN_SHARD_TOKENS = 64
OUTLIER_FACTOR = 2.0  # drop pairs whose norm exceeds this × the batch median (paper)
SCALE_SAMPLE_TOKENS = 16_384  # pairs used to estimate each model's median norm


def default_shard_tokens(tokens: int) -> int:
    """Big shards for real runs; at least ~10 shards for small ones so eval gets its own."""
    return min(DEFAULT_SHARD_TOKENS, max(MIN_SHARD_TOKENS, tokens // 10))


def tokenizer_hash(tokenizer: Any) -> str:
    """Fingerprint of a tokenizer (vocabulary, merges, specials, chat template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Truncation/padding are call-time state the library sets on the backend: not identity.
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        body = json.dumps(spec, sort_keys=True)
    else:
        body = repr(sorted(tokenizer.get_vocab().items()))
    body += "\n" + str(getattr(tokenizer, "chat_template", "") or "")
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


# --- the harvested window of a document ----------------------------------------------------

# Only the first `context_length` tokens of a document are harvested, so only a window of
# characters is read, tokenized and stored: memory is bounded by the batch, not by the
# longest line. 16 characters per token is generous (English averages about 4).
WINDOW_CHARS_PER_TOKEN = 16


def window_chars(context_length: int) -> int:
    return context_length * WINDOW_CHARS_PER_TOKEN


def clip_document(document: Document, max_chars: int) -> Document:
    """The document cut to its first `max_chars` characters (at a word boundary when there
    is one nearby), so a 19 MB line costs what its harvested tokens cost. Chats keep whole
    messages while they fit and cut the message that crosses the limit."""
    if len(document.text) <= max_chars:
        return document
    if not document.is_chat:
        return Document(document.doc_id, _cut(document.text, max_chars), None)
    messages, used = [], 0
    for message in document.messages:
        room = max_chars - used
        if room <= 0:
            break
        content = message["content"] if len(message["content"]) <= room else _cut(message["content"], room)
        messages.append({**message, "content": content})
        used += len(content) + len(MESSAGE_SEPARATOR)
    return Document(document.doc_id, canonical_chat_text(messages), messages)


def _cut(text: str, max_chars: int) -> str:
    """`text[:max_chars]`, backed off to the last whitespace in its final eighth (no split word)."""
    head = text[:max_chars]
    space = max(head.rfind(" "), head.rfind("\n"))
    return head[:space] if space >= max_chars - max_chars // 8 else head


# --- tokenization + alignment ---------------------------------------------------------------


@dataclass
class EncodedDocument:
    """One document tokenized by one model, with its tokens mapped onto canonical text."""

    input_ids: list[int]
    spans: Any  # TokenSpans


def encode_documents(tokenizer: Any, documents: list[Document], context_length: int) -> list[EncodedDocument]:
    """Render and tokenize each document for one model, truncated to `context_length` tokens."""
    rendered = [render_document(tokenizer, doc) for doc in documents]
    special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    out: list[EncodedDocument | None] = [None] * len(documents)
    for add_special in (True, False):  # one batched tokenizer call per flavour
        index = [i for i, r in enumerate(rendered) if r.add_special_tokens == add_special]
        if not index:
            continue
        # One extra token tells whether the last kept token closes a character.
        encoded = tokenizer(
            [rendered[i].string for i in index],
            add_special_tokens=add_special,
            truncation=True,
            max_length=context_length + 1,
            return_offsets_mapping=True,
        )
        for row, i in enumerate(index):
            ids = list(encoded["input_ids"][row])
            offsets = np.asarray(encoded["offset_mapping"][row], dtype=np.int64).reshape(-1, 2)
            next_start = None
            if len(ids) > context_length:
                next_start = int(offsets[context_length, 0])
                ids, offsets = ids[:context_length], offsets[:context_length]
            special = np.isin(np.asarray(ids, dtype=np.int64), special_ids)
            spans = token_spans(rendered[i].string, offsets, special, rendered[i].content_spans, next_start)
            out[i] = EncodedDocument(ids, spans)
    return out  # type: ignore[return-value]


# --- truncated forward ----------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the layer hook: everything after the hooked layer is wasted work."""


def layer_activations(loaded: Any, sequences: list[list[int]], layer: int) -> Any:
    """Residual stream after decoder layer `layer` for right-padded sequences: [B, T, d].

    The forward pass stops at that layer; positions beyond each sequence's length are padding.
    """
    import torch

    lengths = [len(s) for s in sequences]
    width = max(lengths)
    pad_id = loaded.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else 0
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    device = loaded.input_device
    captured: dict[str, Any] = {}

    def grab_and_stop(_module: Any, _inputs: Any, output: Any) -> None:
        captured["hidden"] = layer_output_tensor(output)
        raise _StopForward

    handle = loaded.adapter.layer(layer).register_forward_hook(grab_and_stop)
    try:
        with torch.inference_mode():
            loaded.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "hidden" not in captured:
        raise RuntimeError(f"layer {layer} never ran during the forward pass")
    return captured["hidden"]


def gather_pairs(hidden_BTD: Any, rows: list[int], positions: list[np.ndarray]) -> Any:
    """Rows of `hidden_BTD` at the given per-document positions, concatenated: [P, d] float32 CPU."""
    import torch

    row_index = torch.as_tensor(np.concatenate([np.full(len(p), r) for r, p in zip(rows, positions, strict=True)]))
    pos_index = torch.as_tensor(np.concatenate(positions))
    return hidden_BTD[row_index.to(hidden_BTD.device), pos_index.to(hidden_BTD.device)].float().cpu()


def outlier_mask(norms_a: Any, norms_b: Any, factor: float = OUTLIER_FACTOR) -> Any:
    """True for pairs to keep: neither model's norm exceeds `factor` × its batch median."""
    return (norms_a <= factor * norms_a.median()) & (norms_b <= factor * norms_b.median())


def normalisation_scale(norms: Any, d_a: int, d_b: int) -> float:
    """The scalar that maps the median norm onto √((d_a+d_b)/2) (the paper's normalisation)."""
    median = float(norms.float().median())
    if not math.isfinite(median) or median <= 0:
        raise XdiffError("the harvested activations have zero or non-finite norms", "check the models and the layer")
    return math.sqrt((d_a + d_b) / 2) / median


# --- the harvest loop ---------------------------------------------------------------------


@dataclass
class _DocumentPairs:
    doc_id: int
    text: str
    acts_a: Any  # [n, d_a] float32
    acts_b: Any
    pairs: AlignedPairs


@dataclass
class _PendingShard:
    documents: list[_DocumentPairs] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    n_tokens: int = 0

    def add_stats(self, **values: float) -> None:
        for key, value in values.items():
            self.stats[key] = self.stats.get(key, 0) + value


@dataclass
class HarvestBatch:
    """The outcome of one batch: per-document pairs (outliers dropped) and counters."""

    documents: list[_DocumentPairs]
    stats: list[dict[str, float]]  # per input document


def harvest_batch(
    model_a: Any, model_b: Any, documents: list[Document], *, layer_a: int, layer_b: int, context_length: int
) -> HarvestBatch:
    """Tokenize, align, run both truncated forwards and gather the aligned activations."""
    import torch

    enc_a = encode_documents(model_a.tokenizer, documents, context_length)
    enc_b = encode_documents(model_b.tokenizer, documents, context_length)
    aligned = [align(a.spans, b.spans) for a, b in zip(enc_a, enc_b, strict=True)]
    stats = [
        {
            "documents": 1,
            "aligned_pairs": len(p),
            "content_min": min(p.n_content_a, p.n_content_b),
            "fully_aligned_documents": int(p.fully_aligned),
        }
        for p in aligned
    ]
    rows = [i for i, p in enumerate(aligned) if len(p)]
    if not rows:
        return HarvestBatch([], stats)
    hidden_a = layer_activations(model_a, [enc_a[i].input_ids for i in rows], layer_a)
    acts_a = gather_pairs(hidden_a, list(range(len(rows))), [aligned[i].pos_a for i in rows])
    del hidden_a
    hidden_b = layer_activations(model_b, [enc_b[i].input_ids for i in rows], layer_b)
    acts_b = gather_pairs(hidden_b, list(range(len(rows))), [aligned[i].pos_b for i in rows])
    del hidden_b
    for side, acts, layer in (("A", acts_a, layer_a), ("B", acts_b, layer_b)):
        if not bool(torch.isfinite(acts).all()):
            raise XdiffError(
                f"model {side} produced NaN or infinite activations at layer {layer}",
                "it overflows at this precision or layer: try another --layer or no quantization",
            )
    keep = outlier_mask(acts_a.norm(dim=-1), acts_b.norm(dim=-1)).numpy()
    out, offset = [], 0
    for i in rows:
        n = len(aligned[i])
        keep_doc = keep[offset : offset + n]
        stats[i]["outliers_dropped"] = int(n - keep_doc.sum())
        if keep_doc.any():
            mask = torch.from_numpy(keep_doc)
            out.append(
                _DocumentPairs(
                    documents[i].doc_id, documents[i].text,
                    acts_a[offset : offset + n][mask], acts_b[offset : offset + n][mask],
                    aligned[i].select(keep_doc),
                )
            )
        offset += n
    return HarvestBatch(out, stats)


def _batched(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _to_shard(documents: list[_DocumentPairs], dtype: Any) -> Shard:
    import torch

    def cat_index(name: str) -> Any:
        return torch.from_numpy(np.concatenate([getattr(d.pairs, name) for d in documents]).astype(np.int64))

    return Shard(
        acts_a=torch.cat([d.acts_a for d in documents]).to(dtype),
        acts_b=torch.cat([d.acts_b for d in documents]).to(dtype),
        doc_id=torch.cat([torch.full((len(d.pairs),), d.doc_id, dtype=torch.long) for d in documents]),
        start_a=cat_index("start_a"),
        start_b=cat_index("start_b"),
        end=cat_index("end"),
    )


def _trim(doc: _DocumentPairs, n: int) -> _DocumentPairs:
    """The first `n` pairs of a document (the harvest hit its token target)."""
    keep = np.zeros(len(doc.pairs), dtype=bool)
    keep[:n] = True
    return _DocumentPairs(doc.doc_id, doc.text, doc.acts_a[:n], doc.acts_b[:n], doc.pairs.select(keep))


def _estimate_scales(store_dir: Path, manifest: dict[str, Any]) -> tuple[float, float]:
    """Each model's normalisation scalar from the first stored pairs."""
    import torch

    from xdiff_cli.data.store import SHARDS_DIR, load_shard_file

    norms_a, norms_b, seen = [], [], 0
    for entry in manifest["shards"]:
        shard = load_shard_file(store_dir / SHARDS_DIR / entry["name"])
        norms_a.append(shard.acts_a.float().norm(dim=-1))
        norms_b.append(shard.acts_b.float().norm(dim=-1))
        seen += len(shard)
        if seen >= SCALE_SAMPLE_TOKENS:
            break
    d_a, d_b = manifest["d_a"], manifest["d_b"]
    all_a = torch.cat(norms_a)[:SCALE_SAMPLE_TOKENS]
    all_b = torch.cat(norms_b)[:SCALE_SAMPLE_TOKENS]
    return normalisation_scale(all_a, d_a, d_b), normalisation_scale(all_b, d_a, d_b)


def _aligned_fraction(stats: dict[str, float]) -> float:
    denominator = stats.get("content_min", 0)
    return float(stats.get("aligned_pairs", 0) / denominator) if denominator else 0.0


def harvest(
    model_a: Any,
    model_b: Any,
    documents: Iterable[Document] | str,
    out_dir: Path | str,
    *,
    tokens: int,
    layer_a: int | None = None,
    layer_b: int | None = None,
    context_length: int = 512,
    batch_size: int = 8,
    eval_fraction: float = 0.1,
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_tokens: int | None = None,
    spec_a: str | None = None,
    spec_b: str | None = None,
    revision_a: str = "local",
    revision_b: str = "local",
    corpus: str | None = None,
    progress: bool = True,
    part: Any = None,
) -> ActivationStore | Path:
    """Harvest `tokens` aligned pairs into `out_dir`; resumable and idempotent.

    `documents` is a corpus spec (see `corpus.py`) or an iterable of `Document`s in a fixed
    order. A complete store with the same identity is returned as is; a partial one resumes
    after its last complete shard; one harvested with other settings is refused.

    With `part` (a `parts.Part`), only that part's documents are harvested, up to its share of
    `tokens`, into the part store at `out_dir`, whose path is returned (`parts.merge_parts`
    joins the parts into one store).
    """
    import torch

    if dtype not in DTYPES:
        raise XdiffError(f"unknown store dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    if tokens <= 0:
        raise XdiffError(f"--tokens must be positive, got {tokens}")
    layer_a = model_a.adapter.default_layer if layer_a is None else model_a.adapter.check_layer(layer_a)
    layer_b = model_b.adapter.default_layer if layer_b is None else model_b.adapter.check_layer(layer_b)
    d_a, d_b = model_a.adapter.hidden_size, model_b.adapter.hidden_size
    out_dir = Path(out_dir)
    identity = {
        "model_a": spec_a or str(model_a.path),
        "model_b": spec_b or str(model_b.path),
        "revision_a": revision_a,
        "revision_b": revision_b,
        "layer_a": layer_a,
        "layer_b": layer_b,
        "d_a": d_a,
        "d_b": d_b,
        "tokenizer_hash_a": tokenizer_hash(model_a.tokenizer),
        "tokenizer_hash_b": tokenizer_hash(model_b.tokenizer),
        "dtype": dtype,
        "quant": f"{model_a.quant}/{model_b.quant}",
        "corpus": corpus if corpus is not None else (documents if isinstance(documents, str) else "custom"),
        "context_length": context_length,
        "seed": seed,
        "target_tokens": tokens,
    }
    if part is not None:
        identity["part"] = part.spec
        identity["part_block_docs"] = batch_size  # the split depends on it: parts must agree
        tokens = part.quota(tokens)
    writer = StoreWriter.open_or_create(out_dir, identity)
    if writer.complete:
        return out_dir if part is not None else ActivationStore.open(out_dir)
    manifest = writer.manifest
    shard_tokens = shard_tokens or manifest.get("shard_tokens") or default_shard_tokens(tokens)
    manifest["shard_tokens"] = shard_tokens
    done = manifest["n_tokens"]
    paths.check_free_space(out_dir, estimate_bytes(tokens - done, d_a, d_b), "the activation store")

    start = manifest["next_doc_index"]
    if isinstance(documents, str):
        stream: Iterable[Document] = iter_documents(documents, seed=seed, start=start)
    else:
        stream = (doc for doc in documents if doc.doc_id >= start)
    if part is not None:
        stream = (doc for doc in stream if part.owns(doc.doc_id, batch_size))
    max_chars = window_chars(context_length)
    stream = (clip_document(doc, max_chars) for doc in stream)
    torch_dtype = getattr(torch, dtype)
    pending = _PendingShard()
    totals = dict(manifest["stats"])
    # Shards are written by one background thread (safetensors + fsync release the GIL), so
    # disk writes overlap the next forward passes; at most one write is in flight, in order.
    writer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xdiff-shard-writer")
    in_flight: list[Future] = []

    def flush(next_doc_index: int) -> None:
        nonlocal pending
        shard = _to_shard(pending.documents, torch_dtype)
        documents_text = [(d.doc_id, d.text) for d in pending.documents]
        for future in in_flight:
            future.result()
        in_flight[:] = [writer_thread.submit(writer.write_shard, shard, documents_text, next_doc_index, pending.stats)]
        pending = _PendingShard()

    try:
        with _Progress(progress and done < tokens, total=tokens, completed=done) as bar:
            for batch in _batched(stream if done < tokens else (), batch_size):
                result = harvest_batch(
                    model_a, model_b, batch, layer_a=layer_a, layer_b=layer_b, context_length=context_length
                )
                by_id = {d.doc_id: d for d in result.documents}
                for doc, stats in zip(batch, result.stats, strict=True):
                    pairs = by_id.get(doc.doc_id)
                    room = tokens - done - pending.n_tokens
                    if pairs is not None and len(pairs.pairs) > room:
                        pairs = _trim(pairs, room)
                    pending.add_stats(**stats)
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0) + value
                    if pairs is not None:
                        pending.documents.append(pairs)
                        pending.n_tokens += len(pairs.pairs)
                        bar.advance(len(pairs.pairs), _aligned_fraction(totals))
                    reached = done + pending.n_tokens >= tokens
                    if pending.n_tokens >= shard_tokens or (reached and pending.n_tokens):
                        done += pending.n_tokens
                        flush(doc.doc_id + 1)
                    if reached:
                        break
                if done >= tokens:
                    break
            if pending.n_tokens:  # the corpus ran out before the target
                done += pending.n_tokens
                flush(batch[-1].doc_id + 1)
            for future in in_flight:
                future.result()
    finally:
        writer_thread.shutdown(wait=True)
    if done == 0:
        corpus_name = identity["corpus"]
        if not totals.get("documents"):
            raise XdiffError(f"the corpus {corpus_name} has no documents (it is empty or whitespace only)",
                             "pass a corpus with text: a .txt (one document per line) or .jsonl file")
        raise XdiffError(f"the corpus {corpus_name} yielded no aligned tokens from {int(totals['documents'])} documents",
                         "check that the documents contain text both tokenizers can read")
    if done < tokens and progress:
        from xdiff_cli.console import err_console

        err_console.print(f"[yellow]the corpus ran out after {done:,} aligned tokens (asked for {tokens:,})[/]")
    if part is not None:
        from xdiff_cli.data.parts import write_scale_sample

        write_scale_sample(out_dir, manifest, SCALE_SAMPLE_TOKENS)
        writer.finish_part(aligned_fraction=_aligned_fraction(manifest["stats"]))
        return out_dir
    scale_a, scale_b = _estimate_scales(out_dir, manifest)
    writer.finish(
        scale_a=scale_a,
        scale_b=scale_b,
        aligned_fraction=_aligned_fraction(manifest["stats"]),
        eval_fraction=eval_fraction,
    )
    return ActivationStore.open(out_dir)


class _Progress:
    """Token progress bar with the running aligned fraction (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, completed: int) -> None:
        self.enabled, self.total, self.completed = enabled, total, completed
        self.bar = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from xdiff_cli.console import stage_progress

            self.bar = stage_progress("tok", show_fields="aligned {task.fields[aligned]:.1%}")
            self.bar.__enter__()
            self.task = self.bar.add_task("harvest", total=self.total, completed=self.completed, aligned=0.0)
        return self

    def advance(self, n: int, aligned: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=n, aligned=aligned)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def harvest_run(run: Any, model_a: Any, model_b: Any, progress: bool = True, part: Any = None) -> ActivationStore | Path:
    """Harvest a run's store: settings from `run.settings`, revisions from `run.models`,
    store in `run.store_dir`. Records `aligned_fraction` and `harvested_tokens` in the run's
    metrics; marking the stage done is the stage runner's job. With `part`, harvests that
    part into its part store and returns the part store's path (`parts.merge_parts` then
    builds the run's store)."""
    from xdiff_cli.data.parts import part_dir

    settings = run.settings
    models = run.models
    store = harvest(
        model_a,
        model_b,
        settings.corpus,
        run.store_dir if part is None else part_dir(run.store_dir, part),
        tokens=settings.tokens,
        layer_a=settings.layer_a,
        layer_b=settings.layer_b,
        context_length=settings.context_length,
        batch_size=settings.harvest_batch_size,
        eval_fraction=settings.eval_fraction,
        seed=settings.seed,
        spec_a=settings.model_a or None,
        spec_b=settings.model_b or None,
        revision_a=str((models["a"].revision if "a" in models else None) or "local"),
        revision_b=str((models["b"].revision if "b" in models else None) or "local"),
        progress=progress,
        part=part,
    )
    if part is not None:
        return store
    run.set_metrics(aligned_fraction=store.manifest["aligned_fraction"], harvested_tokens=store.n_tokens)
    return store


def harvest_stage(run: Any, ctx: Any) -> None:  # Run, stages.StageContext
    """The harvest stage: load both pulled models (only now), harvest, then free them.

    With `ctx.merge` it joins the parts harvested with `--shard I/N` instead. Under torchrun
    (`ctx.dist`) every rank harvests its part and rank 0, the one running the stage for the
    world (`stages.run_rank_stage`), merges them after a barrier."""
    if ctx.merge:
        merge_run_parts(run)
        return
    if run.settings.store:
        attach_store(run)
        return
    if ctx.dist is not None:
        _harvest_rank(run, ctx)
        return
    from xdiff_cli.models.pull import load_pulled_model
    from xdiff_cli.run.hardware import free_accelerator_memory

    loaded = []
    try:
        loaded = [load_pulled_model(run, side, ctx) for side in ("a", "b")]
        harvest_run(run, loaded[0], loaded[1], progress=ctx.progress)
    finally:
        loaded.clear()
        free_accelerator_memory()


def attach_store(run: Any) -> ActivationStore:
    """The harvest stage of a run whose store was harvested elsewhere (`--store URL|DIR`):
    check that it is complete and was harvested from this run's models (revisions, widths,
    layers); nothing is copied (training and analysis stream it, `data/remote.py`)."""
    from xdiff_cli.data.store import mismatched_fields, open_store

    settings, models = run.settings, run.models
    store = open_store(settings.store)
    expected: dict[str, Any] = {}
    for side in ("a", "b"):
        model = models.get(side)
        if model is not None and model.revision:
            expected[f"revision_{side}"] = model.revision
        if model is not None and model.d_model:
            expected[f"d_{side}"] = model.d_model
        if getattr(settings, f"layer_{side}") is not None:
            expected[f"layer_{side}"] = getattr(settings, f"layer_{side}")
    wrong = mismatched_fields(store.manifest, expected)
    if wrong:
        details = ", ".join(f"{k}: store {store.manifest.get(k)!r} vs run {expected[k]!r}" for k in wrong)
        raise XdiffError(f"the activation store at {store.location} was harvested from other models or layers ({details})",
                         "give the store of these models, or create the run with the models the store was harvested from")
    run.set_metrics(aligned_fraction=store.manifest["aligned_fraction"], harvested_tokens=store.n_tokens)
    return store


def harvest_part(run: Any, ctx: Any, part: Any, device: str | None = None, loaded_first: Any = None) -> Path:
    """Harvest part `part` (a `parts.Part`) of a run into its own store under
    `activations/parts/`; returns that store's path.

    Not a stage: the harvest stage is done once the parts are merged (`merge_run_parts`). It
    holds the part's lock, not the run's, so the parts of one run (a SLURM array) can be
    harvested at the same time. `loaded_first` is called once the models are loaded (torchrun:
    rank 0 loads first, so the others find anything it had to build in the cache)."""
    from xdiff_cli.data.parts import PARTS_DIR
    from xdiff_cli.locks import exclusive
    from xdiff_cli.models.pull import load_pulled_model
    from xdiff_cli.run.hardware import free_accelerator_memory

    lock = Path(run.store_dir) / PARTS_DIR / f".{part.dirname}.lock"
    loaded = []
    with exclusive(lock, f"part {part.spec} of run {run.id}"):
        try:
            loaded = [load_pulled_model(run, side, ctx, device=device) for side in ("a", "b")]
            if loaded_first is not None:
                loaded_first()
            return harvest_run(run, loaded[0], loaded[1], progress=ctx.progress, part=part)
        finally:
            loaded.clear()
            free_accelerator_memory()


def merge_run_parts(run: Any) -> ActivationStore:
    """Join a run's harvested parts into its activation store; records the harvest metrics."""
    from xdiff_cli.data.parts import merge_parts

    store = merge_parts(run.store_dir, eval_fraction=run.settings.eval_fraction)
    run.set_metrics(aligned_fraction=store.manifest["aligned_fraction"], harvested_tokens=store.n_tokens)
    return store


def _harvest_rank(run: Any, ctx: Any) -> None:
    """One rank's part of a torchrun harvest; rank 0 then merges and tells the others how it went.

    Rank 0 comes here from the stage runner after the pull stage; the others wait for it at
    the first barrier, then read the models it recorded."""
    import torch

    from xdiff_cli.data.parts import Part

    dist = ctx.dist
    device = None
    if torch.cuda.is_available() and run.settings.device != "cpu":
        device = f"cuda:{dist.local_rank}"
    if not dist.is_main:
        dist.barrier()  # rank 0 has pulled and loaded the models: they are in the cache now
        run = run.reload()
    harvest_part(run, ctx, Part(dist.rank, dist.world), device=device,
                 loaded_first=dist.barrier if dist.is_main else None)
    dist.barrier()  # every part is complete
    if not dist.is_main:  # wait for rank 0's merge (and fail with it)
        error = dist.broadcast_object(None)
        if error:
            raise XdiffError(error)
        return
    try:
        merge_run_parts(run)
    except Exception as exc:
        dist.broadcast_object(str(exc) or type(exc).__name__)
        raise
    dist.broadcast_object("")  # the merged store exists before any rank goes on
