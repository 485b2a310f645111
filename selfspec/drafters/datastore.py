"""Token datastores for retrieval drafts (after REST, He et al., NAACL 2024): a user's corpus (code,
docs) tokenized once with the target's tokenizer and indexed by a suffix array, so that the longest
suffix of the context that occurs in the corpus, and what followed it there, are found in
microseconds.

Index: a full suffix array built by divsufsort (Yuta Mori's C library, via the `pydivsufsort` wheel:
O(n log n), a few bytes per input byte). It sorts bytes, so token ids are written as fixed-width
big-endian integers and only suffixes at token boundaries are kept (pydivsufsort does exactly
this for integer arrays), which keeps 262k-token vocabularies exact. Chosen over a numpy-only
index (`np.lexsort` of every position by its next 16 tokens) because that costs 16 sort keys
of memory and time per token and bounds the context length; the suffix array bounds nothing.

A store is a folder: `tokens.npy` (uint32, documents separated by SEP = the vocabulary size, one
SEP at the end), `suffixes.npy` (int32/int64 positions in suffix order) and `meta.json` (format,
model, tokenizer identity, corpus files, build time). Never pickled: `np.load(allow_pickle=False)`.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np

from selfspec.paths import atomic_output, atomic_write_json
from selfspec.errors import SelfspecError, plural

FORMAT = 1
BATCH_CHARS = 1 << 20  # text tokenized per call (and per progress update)
MAX_MATCHES = 256  # continuations read per lookup: an evenly spaced sample of a larger match range


def tokenizer_identity(tokenizer) -> str:
    """SHA-256 of the vocabulary (token -> id) and the special tokens: two tokenizers with the same
    identity give the same ids for the same text."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


@dataclass
class Match:
    length: int  # tokens of the context's suffix that matched
    positions: np.ndarray  # where the continuations start in `tokens` (a sample of at most MAX_MATCHES)
    count: int  # occurrences of the matched suffix in the corpus


class Trie(NamedTuple):
    """A continuation trie (`Datastore.trie`): nodes as `Draft` wants them, the match length, and
    each node's count among the `rows` continuations read (a child's share of its parent's count
    is the frequency hypothesis reduction scores)."""

    tokens: list[int]
    parents: list[int]
    length: int
    counts: list[int]
    rows: int


class Datastore:
    def __init__(self, tokens: np.ndarray, suffixes: np.ndarray, meta: dict) -> None:
        self.tokens, self.suffixes, self.meta = tokens, suffixes, meta
        self.sep = int(meta["sep"])
        self._list = None

    # ------------------------------------------------------------------------------ build / io
    @classmethod
    def build(cls, docs: Iterable[list[int]], sep: int, meta: dict) -> "Datastore":
        parts = []
        for ids in docs:
            parts.append(np.asarray(ids, dtype=np.uint32))
            parts.append(np.array([sep], dtype=np.uint32))
        tokens = np.concatenate(parts) if parts else np.array([sep], dtype=np.uint32)
        from pydivsufsort import divsufsort

        suffixes = divsufsort(tokens)
        return cls(tokens, suffixes, {**meta, "format": FORMAT, "sep": sep, "tokens": int(tokens.size)})

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in (("tokens.npy", self.tokens), ("suffixes.npy", self.suffixes)):
            with atomic_output(folder / name) as tmp:
                np.save(tmp, array)
        atomic_write_json(folder / "meta.json", self.meta)  # last: a folder with meta.json is whole

    @classmethod
    def load(cls, folder: str | Path) -> "Datastore":
        folder = Path(folder).expanduser()
        meta_file = folder / "meta.json"
        if not meta_file.is_file():
            raise SelfspecError(f"{folder} is not a datastore (no meta.json); build one with `selfspec datastore build`")
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("format") != FORMAT:
                raise SelfspecError(f"datastore {folder} has format {meta.get('format')!r}, this selfspec reads "
                                    f"{FORMAT}; rebuild it with `selfspec datastore build`")
            tokens = np.load(folder / "tokens.npy", allow_pickle=False)
            suffixes = np.load(folder / "suffixes.npy", allow_pickle=False)
        except (OSError, ValueError, KeyError) as e:
            raise SelfspecError(f"datastore {folder} is damaged ({e}); rebuild it with `selfspec datastore build`") from None
        if tokens.shape != suffixes.shape or tokens.size != meta.get("tokens"):
            raise SelfspecError(f"datastore {folder} is damaged (sizes disagree); rebuild it")
        return cls(tokens, suffixes, meta)

    def check_tokenizer(self, tokenizer, model_name: str) -> None:
        if tokenizer_identity(tokenizer) != self.meta.get("tokenizer_sha256"):
            raise SelfspecError(
                f"the datastore was built with the tokenizer of {self.meta.get('model')!r}, which differs from "
                f"that of {model_name!r}; build one for this model with `selfspec datastore build --model {model_name}`")

    @property
    def nbytes(self) -> int:
        return int(self.tokens.nbytes + self.suffixes.nbytes)

    # ------------------------------------------------------------------------------ lookup
    def _range(self, pattern: list[int]) -> tuple[int, int]:
        """[lo, hi) of the suffixes that start with `pattern` (binary search; O(len * log n))."""
        toks, sa, n = self.tokens, self.suffixes, len(pattern)

        def head(i: int) -> list[int]:
            p = int(sa[i])
            return toks[p: p + n].tolist()

        lo, hi = 0, sa.size
        while lo < hi:  # first suffix >= pattern
            mid = (lo + hi) // 2
            if head(mid) < pattern:
                lo = mid + 1
            else:
                hi = mid
        start, hi = lo, sa.size
        while lo < hi:  # first suffix whose head is > pattern
            mid = (lo + hi) // 2
            if head(mid) <= pattern:
                lo = mid + 1
            else:
                hi = mid
        return start, lo

    def match(self, context: list[int], max_len: int = 16, min_len: int = 2) -> Match | None:
        """The longest suffix of `context` (between min_len and max_len tokens) found in the corpus.
        Occurrence is monotone in the length (a suffix that occurs has shorter suffixes that occur),
        so the length is found by bisection: ~log2(max_len) range searches."""
        best = None
        lo_len, hi_len = min_len, min(max_len, len(context))
        while lo_len <= hi_len:
            mid = (lo_len + hi_len) // 2
            lo, hi = self._range(list(context[-mid:]))
            if hi > lo:
                best, lo_len = (mid, lo, hi), mid + 1
            else:
                hi_len = mid - 1
        if best is None:
            return None
        length, lo, hi = best
        rows = np.arange(lo, hi) if hi - lo <= MAX_MATCHES else np.linspace(lo, hi - 1, MAX_MATCHES).astype(np.int64)
        return Match(length, self.suffixes[rows].astype(np.int64) + length, hi - lo)

    def continuations(self, match: Match, depth: int) -> np.ndarray:
        """`[matches, depth]` tokens following each occurrence; SEP from a document's end on."""
        idx = np.minimum(match.positions[:, None] + np.arange(depth), self.tokens.size - 1)
        rows = self.tokens[idx].astype(np.int64)
        ended = np.maximum.accumulate(rows == self.sep, axis=1)
        rows[ended] = self.sep
        return rows

    def chain(self, context: list[int], depth: int, max_len: int = 16, min_len: int = 2) -> tuple[list[int], int]:
        """The most frequent continuation, token by token (each step among the occurrences that
        agree so far), and the match length (0: no match)."""
        m = self.match(context, max_len, min_len)
        if m is None or depth < 1:
            return [], 0
        rows, out = self.continuations(m, depth), []
        for d in range(depth):
            values, counts = np.unique(rows[:, d], return_counts=True)
            tok = int(values[counts.argmax()])
            if tok == self.sep:
                break
            out.append(tok)
            rows = rows[rows[:, d] == tok]
        return out, m.length

    def trie(self, context: list[int], depth: int, max_nodes: int, max_len: int = 16, min_len: int = 2) -> Trie:
        """Several continuations as a token tree (REST's candidate trie): the `max_nodes` most
        frequent prefixes of the continuations, parents[i] < i and -1 for children of the pending
        token (`Draft.parents`); length 0 and no nodes without a match. A node is never more
        frequent than its parent and is deeper, so sorting by (-count, depth) puts every parent
        before its children."""
        m = self.match(context, max_len, min_len)
        if m is None or depth < 1 or max_nodes < 1:
            return Trie([], [], 0, [], 0)
        counts: dict[tuple, int] = {}
        rows = self.continuations(m, depth).tolist()
        for row in rows:
            for d in range(depth):
                if row[d] == self.sep:
                    break
                key = tuple(row[: d + 1])
                counts[key] = counts.get(key, 0) + 1
        chosen = sorted(counts, key=lambda key: (-counts[key], len(key), key))[:max_nodes]
        where = {key: i for i, key in enumerate(chosen)}
        parents = [where[key[:-1]] if len(key) > 1 else -1 for key in chosen]
        return Trie([key[-1] for key in chosen], parents, m.length, [counts[key] for key in chosen], len(rows))


def build_store(tokenizer, model_name: str, files: list[Path], progress: Callable[[int, int], None] | None = None
                ) -> Datastore:
    """Tokenize `files` (UTF-8 text; others are skipped and counted) and index them."""
    t0 = time.perf_counter()
    docs, skipped, total = [], [], sum(f.stat().st_size for f in files)
    done, batch = 0, []

    def flush() -> None:  # a batch is tokenized on all cores (Rust tokenizers)
        if batch:
            docs.extend(tokenizer(batch, add_special_tokens=False).input_ids)
            batch.clear()
        if progress is not None:
            progress(done, total)

    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped.append(str(f))
            text = ""
        if text:
            batch.append(text)
        done += f.stat().st_size
        if sum(map(len, batch)) >= BATCH_CHARS:
            flush()
    flush()
    if not any(docs):
        named = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        raise SelfspecError(f"no text to index in the corpus ({plural(len(files), 'file')}): "
                            + (f"not UTF-8 or unreadable, skipped: {named}" if skipped else "every file is empty"))
    t1 = time.perf_counter()
    meta = {"model": model_name, "tokenizer_sha256": tokenizer_identity(tokenizer),
            "vocab_size": len(tokenizer), "files": len(files) - len(skipped), "skipped_files": skipped[:20],
            "n_skipped": len(skipped), "corpus_bytes": total}
    store = Datastore.build(docs, sep=len(tokenizer), meta=meta)
    store.meta.update(tokenize_seconds=round(t1 - t0, 3), index_seconds=round(time.perf_counter() - t1, 3))
    return store


def corpus_files(paths: list[Path]) -> list[Path]:
    """Files named, and the files under folders named (recursively, hidden ones skipped), sorted."""
    out = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file()
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            out.append(p)
        else:
            raise SelfspecError(f"corpus path {str(p)!r} does not exist")
    if not out:
        raise SelfspecError("the corpus is empty: give text files or folders holding them")
    return out


def build_command(model: str, paths: list[Path], out: Path) -> dict:
    """`selfspec datastore build`: a progress bar while tokenizing, a summary line on stderr."""
    import sys

    from selfspec.models.loading import load_tokenizer
    from selfspec.progress import Bar

    files = corpus_files(paths)
    t0 = time.perf_counter()
    tokenizer, name = load_tokenizer(model)
    with Bar("tokenizing (KiB)") as bar:
        store = build_store(tokenizer, name, files, lambda done, total: bar.update(completed=done >> 10, total=total >> 10))
    skipped = store.meta["skipped_files"]
    if skipped:
        more = store.meta["n_skipped"] - len(skipped)
        print(f"skipped {plural(store.meta['n_skipped'], 'file')} that are not UTF-8 text: {', '.join(skipped)}"
              + (f" and {more} more" if more else ""), file=sys.stderr)
    store.meta["build_seconds"] = round(time.perf_counter() - t0, 3)
    store.save(out)
    m = store.meta
    print(f"datastore {out}: {m['tokens']:,} tokens from {plural(m['files'], 'file')} ({m['corpus_bytes'] / 2**20:.1f} MiB of "
          f"text, {m['n_skipped']} not UTF-8 skipped), {store.nbytes / 2**20:.1f} MiB on disk; built in "
          f"{m['build_seconds']:.1f} s (tokenize {m['tokenize_seconds']:.1f} s, suffix array "
          f"{m['index_seconds']:.2f} s)", file=sys.stderr)
    return {"out": str(out), "bytes": store.nbytes, **{k: v for k, v in m.items() if k != "skipped_files"}}
