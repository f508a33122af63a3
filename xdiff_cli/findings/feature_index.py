"""FeatureIndex: the analysis results of a run, in one SQLite file the CLI and TUI query.

Written once by `analysis.py` through `FeatureIndexWriter` (to a temporary file renamed
into place on success, so a crash never leaves a half-written index that a later command
trusts); read by `xdiff features`, `xdiff report`, `xdiff steer` (s_max) and the TUI.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdiff_cli.errors import XdiffError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (
    id INTEGER PRIMARY KEY,
    partition TEXT NOT NULL CHECK (partition IN ('a', 'b', 'shared')),
    frequency REAL NOT NULL,          -- share of analysed token pairs where it fires
    n_fires INTEGER NOT NULL,
    mean_activation REAL NOT NULL,    -- mean over the tokens where it fires
    max_activation REAL NOT NULL,     -- s_max: steering's unit (alpha = 1)
    dec_norm_a REAL NOT NULL,
    dec_norm_b REAL NOT NULL,
    rel_norm REAL NOT NULL,           -- R = |d_a| / (|d_a| + |d_b|)
    dec_cos REAL,                     -- A/B decoder cosine; NULL when the widths differ
    n_distinct_tokens INTEGER NOT NULL,
    top_token TEXT,
    top_token_share REAL NOT NULL,
    token_artifact INTEGER NOT NULL,  -- fires on one word tokenised differently by A and B
    candidate INTEGER NOT NULL,       -- exclusive block, or shared with R < 0.2 / R > 0.8
    score REAL NOT NULL,              -- default ranking score (higher = more worth a look)
    rank INTEGER NOT NULL,            -- 1 = first in the default ranking
    histogram TEXT NOT NULL,          -- JSON: {"edges": [...], "counts": [...]}
    label TEXT
);
CREATE TABLE examples (
    feature_id INTEGER NOT NULL REFERENCES features(id),
    view TEXT NOT NULL CHECK (view IN ('a', 'b')),
    rank INTEGER NOT NULL,            -- 0 = strongest
    text TEXT NOT NULL,               -- the context window
    start INTEGER NOT NULL,           -- [start, end): the firing token, within text
    "end" INTEGER NOT NULL,
    activation REAL NOT NULL,
    token_acts TEXT NOT NULL,         -- JSON [[start, end, activation], ...] within text
    doc_id INTEGER,
    PRIMARY KEY (feature_id, view, rank)
);
CREATE INDEX features_by_rank ON features(rank);
CREATE INDEX features_by_partition ON features(partition, rank);
"""

FEATURE_COLUMNS = (
    "id", "partition", "frequency", "n_fires", "mean_activation", "max_activation", "dec_norm_a",
    "dec_norm_b", "rel_norm", "dec_cos", "n_distinct_tokens", "top_token", "top_token_share",
    "token_artifact", "candidate", "score", "rank", "histogram", "label",
)
EXAMPLE_COLUMNS = ("feature_id", "view", "rank", "text", "start", "end", "activation", "token_acts", "doc_id")
_EXAMPLE_SELECT = ", ".join(f'"{c}"' for c in EXAMPLE_COLUMNS)
SORT_KEYS = {
    "rank": "rank ASC",
    "id": "id ASC",
    "frequency": "frequency DESC",
    "max_activation": "max_activation DESC",
    "rel_norm": "rel_norm DESC",
    "score": "score DESC",
}


# A token where the feature fires at all gets at least this much of the shading ramp, so weak
# co-firings stay visible next to an unshaded (silent) token (TUI, `xdiff features`, report).
SHADE_FLOOR = 0.15


def shade_level(act: float, max_act: float) -> float:
    """Where on the shading ramp a token firing at `act` sits: 0 silent, else in [SHADE_FLOOR, 1]."""
    if act <= 0 or max_act <= 0:
        return 0.0
    return SHADE_FLOOR + (1.0 - SHADE_FLOOR) * min(1.0, act / max_act)


@dataclass
class Example:
    text: str
    start: int
    end: int
    activation: float
    token_acts: list[tuple[int, int, float]]
    view: str = "a"
    doc_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "start": self.start, "end": self.end, "activation": self.activation}

    def token_spans(self) -> list[tuple[int, int, float]]:
        """(start, end, activation) of every token of the context window, in text order. The
        firing token is always among them: an example stored without per-token values
        still has that one."""
        n = len(self.text)
        spans = [(int(s), int(e), float(a)) for s, e, a in self.token_acts if 0 <= s < e <= n]
        if not any((s, e) == (self.start, self.end) for s, e, _ in spans):
            spans.append((self.start, self.end, float(self.activation)))
        return sorted(spans)


@dataclass
class Feature:
    id: int
    partition: str
    frequency: float
    n_fires: int
    mean_activation: float
    max_activation: float
    dec_norm_a: float
    dec_norm_b: float
    rel_norm: float
    dec_cos: float | None
    n_distinct_tokens: int
    top_token: str | None
    top_token_share: float
    token_artifact: bool
    candidate: bool
    score: float
    rank: int
    histogram: dict[str, list[float]]
    label: str | None = None
    label_score: float | None = None  # detection AUC of an `xdiff label` label (label.py)
    examples: list[Example] = field(default_factory=list)
    # From `xdiff verify` (None when not verified); see xdiff_cli/findings/verify.py.
    verdict: str | None = None
    verdict_reason: str | None = None
    verdict_confidence: str | None = None
    probe_r2: float | None = None  # held-out R² of the activation from the other model's residual
    probe_auc: float | None = None  # ... AUC of fires-vs-not
    ceiling_r2: float | None = None  # ... from its own model
    found_in_shared: bool = False
    probe_side: str | None = None  # the model that (best) predicts it: the side a verified difference belongs to
    kl_own: float | None = None
    kl_other: float | None = None

    @property
    def alive(self) -> bool:
        return self.n_fires > 0

    def examples_for(self, view: str) -> list[Example]:
        return [e for e in self.examples if e.view == view]

    @property
    def own_view(self) -> str:
        """The model whose tokens best show this feature (B for B-exclusive, else A)."""
        return "b" if self.partition == "b" else "a"

    def to_json(self, n_examples: int | None = None) -> dict[str, Any]:
        examples = self.examples_for(self.own_view)[:n_examples]
        out = {name: getattr(self, name) for name in FEATURE_COLUMNS if name not in ("histogram",)}
        out["token_artifact"] = bool(self.token_artifact)
        out["candidate"] = bool(self.candidate)
        out["histogram"] = self.histogram
        out["label_score"] = self.label_score
        out["examples"] = [e.to_json() for e in examples]
        for name in _VERDICT_FIELDS:
            out[name] = getattr(self, name)
        out["found_in_shared"] = bool(self.found_in_shared)
        return out


_VERDICT_FIELDS = ("verdict", "verdict_reason", "verdict_confidence", "probe_r2", "probe_auc", "ceiling_r2", "kl_own", "kl_other")


def _with_evidence(feature: Feature, evidence: dict) -> Feature:  # noqa: ANN001 - {id: verify.Evidence}
    ev = evidence.get(feature.id)
    if ev is not None:
        feature.verdict, feature.verdict_reason, feature.verdict_confidence = ev.verdict, ev.reason, ev.confidence
        feature.probe_r2, feature.probe_auc, feature.ceiling_r2 = ev.probe_r2, ev.probe_auc, ev.ceiling_r2
        feature.found_in_shared = bool(ev.found_in_shared)
        feature.probe_side = ev.own_side
        feature.kl_own, feature.kl_other = ev.kl_own, ev.kl_other
    return feature


def _feature_from_row(row: sqlite3.Row) -> Feature:
    data = dict(row)
    data["histogram"] = json.loads(data["histogram"])
    data["token_artifact"] = bool(data["token_artifact"])
    data["candidate"] = bool(data["candidate"])
    # An `xdiff label` label, when there is one, takes the place of analysis' own note.
    auto_label = data.pop("auto_label", None)
    if auto_label:
        data["label"] = auto_label
    return Feature(**data)


def _example_from_row(row: sqlite3.Row) -> Example:
    return Example(
        text=row["text"], start=row["start"], end=row["end"], activation=row["activation"],
        token_acts=[tuple(t) for t in json.loads(row["token_acts"])], view=row["view"], doc_id=row["doc_id"],
    )


# A search term matches an example when it occurs within this many characters of the
# firing token (the token itself and a word or two either side), not anywhere in the window.
SEARCH_NEIGHBOURHOOD_CHARS = 16


def _filters(
    partition: str | None, search: str | None, candidates_only: bool, alive_only: bool, labels: bool = False
) -> tuple[list[str], list[Any]]:
    """SQL conditions (and their parameters) shared by `features()` and `count_matching()`."""
    where: list[str] = []
    params: list[Any] = []
    if partition not in (None, "all"):
        if partition not in ("a", "b", "shared"):
            raise XdiffError(f"unknown partition {partition!r}", "use a, b, shared or all")
        where.append("partition = ?")
        params.append(partition)
    if candidates_only:
        where.append("candidate = 1")
    if alive_only:
        where.append("n_fires > 0")
    if search:
        near = SEARCH_NEIGHBOURHOOD_CHARS
        matches = (
            "id IN (SELECT feature_id FROM examples WHERE "
            f"substr(text, max(1, start + 1 - {near}), \"end\" - max(0, start - {near}) + {near}) "
            "LIKE ? ESCAPE '\\')"
        )
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        params.append(f"%{escaped}%")
        if labels:  # `xdiff label` labels and descriptions match too
            matches += (" OR id IN (SELECT feature_id FROM labels WHERE label LIKE ? ESCAPE '\\'"
                        " OR description LIKE ? ESCAPE '\\')")
            params += [f"%{escaped}%", f"%{escaped}%"]
        where.append(f"({matches})")
    return where, params


class _GuardedConnection:
    """A read connection whose damaged-file errors (met lazily, page by page) are user errors."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db, self._path = db, path

    def _corrupt(self, exc: sqlite3.DatabaseError) -> XdiffError:
        return XdiffError(f"the analysis database {self._path} is corrupt ({exc})", "rerun `xdiff analyze --force`")

    def execute(self, sql: str, params: Any = ()) -> _GuardedCursor:
        try:
            return _GuardedCursor(self._db.execute(sql, params), self)
        except sqlite3.DatabaseError as exc:
            raise self._corrupt(exc) from exc

    def close(self) -> None:
        self._db.close()

    def __getattr__(self, name: str) -> Any:  # anything else: the plain connection
        return getattr(self._db, name)


class _GuardedCursor:
    def __init__(self, cursor: sqlite3.Cursor, owner: _GuardedConnection) -> None:
        self._cursor, self._owner = cursor, owner

    def fetchone(self) -> Any:
        try:
            return self._cursor.fetchone()
        except sqlite3.DatabaseError as exc:
            raise self._owner._corrupt(exc) from exc

    def fetchall(self) -> list[Any]:
        try:
            return self._cursor.fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._owner._corrupt(exc) from exc

    def __iter__(self):  # noqa: ANN204
        return iter(self.fetchall())


class FeatureIndex:
    """Read-only queries over a run's `analysis.sqlite`."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path
        # `xdiff label` adds a labels table (label.py) to an analysed run; older runs have none.
        self._labels = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'labels'"
        ).fetchone() is not None

        self._evidence: dict | None = None

    @property
    def evidence(self) -> dict:
        """{feature id: verify.Evidence} ({} when not verified); a damaged table is an XdiffError."""
        if self._evidence is None:
            self._evidence = read_evidence(self._db, self.path)
        return self._evidence

    @property
    def verified(self) -> bool:
        return bool(self.evidence)

    @classmethod
    def open(cls, path: Path | str) -> FeatureIndex:
        path = Path(path)
        if not path.is_file():
            raise XdiffError("this run has not been analysed yet", "run `xdiff analyze` (or rerun `xdiff run`)")
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            db.row_factory = sqlite3.Row
            version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise XdiffError(f"the analysis database {path} is corrupt", "rerun `xdiff analyze`") from exc
        if version is None or json.loads(version[0]) != SCHEMA_VERSION:
            raise XdiffError(f"{path} was written by another xdiff version", "rerun `xdiff analyze`")
        return cls(_GuardedConnection(db, path), path)  # type: ignore[arg-type]

    def close(self) -> None:
        self._db.close()

    @property
    def meta(self) -> dict[str, Any]:
        return {row["key"]: json.loads(row["value"]) for row in self._db.execute("SELECT key, value FROM meta")}

    @property
    def n_features(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM features").fetchone()[0]

    def count(self, partition: str | None = None) -> int:
        if partition in (None, "all"):
            return self.n_features
        return self._db.execute("SELECT COUNT(*) FROM features WHERE partition = ?", (partition,)).fetchone()[0]

    def features(
        self,
        partition: str | None = None,
        sort: str = "rank",
        limit: int | None = None,
        search: str | None = None,
        candidates_only: bool = False,
        alive_only: bool = False,
    ) -> list[Feature]:
        """Feature summaries (without examples), in `sort` order."""
        if sort not in SORT_KEYS:
            raise XdiffError(f"unknown sort key {sort!r}", f"use one of {', '.join(SORT_KEYS)}")
        where, params = _filters(partition, search, candidates_only, alive_only, labels=self._labels)
        sql = f"SELECT {self._select()} FROM features"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {SORT_KEYS[sort]}, id ASC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        evidence = self.evidence
        return [_with_evidence(_feature_from_row(r), evidence) for r in self._db.execute(sql, params)]

    def _select(self) -> str:
        """Feature columns, plus the label and its score from the labels table when present."""
        columns = ", ".join(FEATURE_COLUMNS)
        if not self._labels:
            return columns
        return (f"{columns}, (SELECT label FROM labels WHERE labels.feature_id = features.id) AS auto_label, "
                "(SELECT auc FROM labels WHERE labels.feature_id = features.id AND labels.label IS NOT NULL) AS label_score")

    def count_matching(
        self, partition: str | None = None, search: str | None = None, alive_only: bool = False
    ) -> int:
        """How many features `features()` would list without a limit (the display limit is separate)."""
        where, params = _filters(partition, search, False, alive_only, labels=self._labels)
        sql = "SELECT COUNT(*) FROM features" + (" WHERE " + " AND ".join(where) if where else "")
        return self._db.execute(sql, params).fetchone()[0]

    def block_counts(self) -> dict[str, dict[str, int]]:
        """Per block ('a', 'b', 'shared'): {"total": n, "live": features that fire at least once}."""
        counts = {p: {"total": 0, "live": 0} for p in ("a", "b", "shared")}
        sql = "SELECT partition, COUNT(*), SUM(n_fires > 0) FROM features GROUP BY partition"
        for partition, total, live in self._db.execute(sql):
            counts[partition] = {"total": int(total), "live": int(live or 0)}
        return counts

    def examples(self, feature_id: int, view: str | None = None, limit: int | None = None) -> list[Example]:
        sql = f"SELECT {_EXAMPLE_SELECT} FROM examples WHERE feature_id = ?"
        params: list[Any] = [feature_id]
        if view:
            sql += " AND view = ?"
            params.append(view)
        sql += " ORDER BY view, rank"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [_example_from_row(r) for r in self._db.execute(sql, params)]

    def feature(self, feature_id: int) -> Feature:
        """One feature with its examples; out-of-range ids are a user error."""
        row = self._db.execute(
            f"SELECT {self._select()} FROM features WHERE id = ?", (int(feature_id),)
        ).fetchone()
        if row is None:
            raise XdiffError(
                f"feature {feature_id} is out of range", f"this run has features 0..{self.n_features - 1}"
            )
        feature = _with_evidence(_feature_from_row(row), self.evidence)
        feature.examples = self.examples(feature.id)
        return feature


class FeatureIndexWriter:
    """Builds `analysis.sqlite` in a temporary file; `commit()` renames it into place."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.tmp_path.unlink(missing_ok=True)
        self._db = sqlite3.connect(self.tmp_path)
        self._db.executescript(_SCHEMA)
        self.set_meta(schema_version=SCHEMA_VERSION)

    def set_meta(self, **values: Any) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in values.items()],
        )

    def add_features(self, rows: list[dict[str, Any]]) -> None:
        """Rows keyed by FEATURE_COLUMNS; `histogram` may be a dict (JSON-encoded here)."""
        prepared = []
        for row in rows:
            row = dict(row)
            if not isinstance(row.get("histogram"), str):
                row["histogram"] = json.dumps(row.get("histogram") or {"edges": [], "counts": []})
            row.setdefault("label", None)
            row.setdefault("dec_cos", None)
            prepared.append(tuple(row[c] for c in FEATURE_COLUMNS))
        placeholders = ", ".join("?" for _ in FEATURE_COLUMNS)
        self._db.executemany(f"INSERT INTO features ({', '.join(FEATURE_COLUMNS)}) VALUES ({placeholders})", prepared)

    def add_examples(self, rows: list[dict[str, Any]]) -> None:
        prepared = []
        for row in rows:
            row = dict(row)
            if not isinstance(row.get("token_acts"), str):
                row["token_acts"] = json.dumps([list(t) for t in row.get("token_acts", [])])
            row.setdefault("doc_id", None)
            prepared.append(tuple(row[c] for c in EXAMPLE_COLUMNS))
        placeholders = ", ".join("?" for _ in EXAMPLE_COLUMNS)
        self._db.executemany(f"INSERT INTO examples ({_EXAMPLE_SELECT}) VALUES ({placeholders})", prepared)

    def commit(self) -> Path:
        from xdiff_cli.atomic import disk_full_error

        try:
            self._db.commit()
            self._db.close()
            os.replace(self.tmp_path, self.path)
        except sqlite3.OperationalError as exc:
            self.abort()
            if "full" in str(exc).lower():
                raise disk_full_error(self.path) from exc
            raise
        return self.path

    def abort(self) -> None:
        try:
            self._db.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> FeatureIndexWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # noqa: ANN001
        if exc_type is None:
            self.commit()
        else:
            self.abort()


# --- verify evidence (written by verify.py, read with every feature) ---------------------------

VERDICTS = ("exclusive", "analogous", "dead", "weak")
EVIDENCE_TABLE = "verify_evidence"
EVIDENCE_COLUMNS = (
    "id", "verdict", "confidence", "reason", "own_side", "found_in_shared", "probe_r2", "probe_auc",
    "ceiling_r2", "ceiling_auc", "r2_a", "r2_b", "auc_a", "auc_b", "n_fires_eval", "kl_own", "kl_other",
)
_EVIDENCE_SCHEMA = f"""
CREATE TABLE {EVIDENCE_TABLE} (
    id INTEGER PRIMARY KEY REFERENCES features(id),
    verdict TEXT CHECK (verdict IS NULL OR verdict IN ('exclusive', 'analogous', 'dead', 'weak')),
    confidence TEXT,          -- high / medium / low (NULL without a verdict)
    reason TEXT,              -- one line
    own_side TEXT,            -- 'a' or 'b': the model that (best) predicts the feature
    found_in_shared INTEGER NOT NULL DEFAULT 0,  -- a difference the probe found in the shared block
    probe_r2 REAL,            -- held-out R² from the OTHER model's residual (transfer)
    probe_auc REAL,           -- held-out AUC of fires-vs-not from the other model
    ceiling_r2 REAL,          -- the same from the feature's own model
    ceiling_auc REAL,
    r2_a REAL, r2_b REAL, auc_a REAL, auc_b REAL,
    n_fires_eval INTEGER,
    kl_own REAL,              -- steer check: mean KL in its own model (NULL = not checked)
    kl_other REAL             -- ... and with the mapped direction in the other model
);
"""


@dataclass
class Evidence:
    id: int
    verdict: str | None = None
    confidence: str | None = None
    reason: str | None = None
    own_side: str | None = None
    found_in_shared: int = 0
    probe_r2: float | None = None
    probe_auc: float | None = None
    ceiling_r2: float | None = None
    ceiling_auc: float | None = None
    r2_a: float | None = None
    r2_b: float | None = None
    auc_a: float | None = None
    auc_b: float | None = None
    n_fires_eval: int | None = None
    kl_own: float | None = None
    kl_other: float | None = None

    def row(self) -> tuple:
        return tuple(getattr(self, c) for c in EVIDENCE_COLUMNS)



def read_evidence(db: sqlite3.Connection, path: Path) -> dict[int, Evidence]:
    """The evidence rows ({} when the run is not verified); a damaged table is a user error."""
    try:
        exists = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (EVIDENCE_TABLE,)).fetchone()
        if not exists:
            return {}
        columns = [r[1] for r in db.execute(f"PRAGMA table_info({EVIDENCE_TABLE})")]
        if tuple(columns) != EVIDENCE_COLUMNS:
            raise sqlite3.DatabaseError("unexpected columns")
        rows = db.execute(f"SELECT {', '.join(EVIDENCE_COLUMNS)} FROM {EVIDENCE_TABLE}").fetchall()
        out = {}
        for row in rows:
            ev = Evidence(*row)
            if ev.verdict not in (None, *VERDICTS):
                raise sqlite3.DatabaseError(f"bad verdict {ev.verdict!r}")
            out[ev.id] = ev
        return out
    except sqlite3.DatabaseError as exc:
        raise XdiffError(corrupt_message(path), "rerun `xdiff verify --force`") from exc


def corrupt_message(path: Path) -> str:
    return f"the verify evidence in {path} is corrupt"


def verdict_rank_key(score: float, verdict: str | None, alive: bool, fid: int) -> tuple:
    """Verified differences first, dead last, otherwise the analysis ranking (its score)."""
    tier = 0 if verdict == "exclusive" else 2 if not alive or verdict == "dead" else 1
    return (tier, -score, fid)


def write_evidence(path: Path, evidence: list[Evidence], meta: dict[str, Any]) -> None:
    """Replace the evidence table, the `verify` meta entry and the ranking, in one transaction."""
    from xdiff_cli.atomic import disk_full_error

    db = sqlite3.connect(path, isolation_level=None)  # explicit transaction: DDL included
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(f"DROP TABLE IF EXISTS {EVIDENCE_TABLE}")
            db.execute(_EVIDENCE_SCHEMA)
            placeholders = ", ".join("?" for _ in EVIDENCE_COLUMNS)
            db.executemany(
                f"INSERT INTO {EVIDENCE_TABLE} ({', '.join(EVIDENCE_COLUMNS)}) VALUES ({placeholders})",
                [e.row() for e in evidence],
            )
            verdicts = {e.id: e.verdict for e in evidence}
            rows = db.execute("SELECT id, score, n_fires FROM features").fetchall()
            order = sorted(rows, key=lambda r: verdict_rank_key(r[1], verdicts.get(r[0]), r[2] > 0, r[0]))
            db.executemany("UPDATE features SET rank = ? WHERE id = ?", [(i + 1, r[0]) for i, r in enumerate(order)])
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('verify', ?)", (json.dumps(meta),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    except sqlite3.OperationalError as exc:
        if "full" in str(exc).lower():
            raise disk_full_error(path) from exc
        raise
    finally:
        db.close()


def update_steer_checks(path: Path, results: dict[int, tuple[float, float]]) -> None:
    db = sqlite3.connect(path)
    try:
        with db:
            db.executemany(
                f"UPDATE {EVIDENCE_TABLE} SET kl_own = ?, kl_other = ? WHERE id = ?",
                [(own, other, fid) for fid, (own, other) in results.items()],
            )
    finally:
        db.close()


