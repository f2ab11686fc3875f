"""Exact dedup (hash of normalised text), near-dedup (MinHash LSH, `datasketch`), and
decontamination against evaluation text (word n-gram overlap).

Near-dedup: every document becomes the set of its word 5-grams (datatrove's `n_grams=5`); `datasketch`
gives each set a MinHash signature (`num_perm` permutations) and `MinHashLSH` proposes candidate
pairs whose Jaccard similarity is probably above `threshold`. A candidate counts only when the
signatures' estimated Jaccard really is >= threshold (LSH banding admits false positives). The first
document of a cluster in corpus order is kept; the audit names it as each removed twin's `kept_twin`.

Decontamination (GPT-3 style): a training document is removed when it shares at least
`min_matches` word 13-grams with the evaluation text. As in GPT-3, n-grams that are common in the
training corpus (in more than `max_doc_freq` documents: licence headers, test idioms) are ignored.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from celeris.errors import CelerisError

_WORD = re.compile(r"\w+", re.UNICODE)


def normalise(text: str) -> str:
    """NFKC, lower case, whitespace runs collapsed: what 'the same text' means for exact dedup."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def exact_hash(text: str) -> str:
    return hashlib.sha1(normalise(text).encode("utf-8")).hexdigest()


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters/digits/underscore), punctuation dropped."""
    return _WORD.findall(text.lower())


def shingles(text: str, n: int = 5) -> set[bytes]:
    """Word n-grams of a document (the whole document when it is shorter than n words)."""
    w = words(text)
    if len(w) < n:
        return {" ".join(w).encode("utf-8")} if w else set()
    return {" ".join(w[i : i + n]).encode("utf-8") for i in range(len(w) - n + 1)}


def check_threshold(threshold: float) -> float:
    if not 0.0 < threshold < 1.0:
        raise CelerisError(f"the near-duplicate threshold must be in (0, 1), got {threshold}")
    return threshold


class NearDuplicateIndex:
    """MinHash LSH over documents added in order; `add` returns the id of an earlier near twin."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        from datasketch import MinHash, MinHashLSH

        check_threshold(threshold)
        if ngram < 1:
            raise CelerisError(f"the shingle size must be >= 1, got {ngram}")
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        self._MinHash = MinHash
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.signatures: dict[str, object] = {}
        self.order: dict[str, int] = {}

    def signature(self, text: str):
        m = self._MinHash(num_perm=self.num_perm, seed=self.seed)
        sh = shingles(text, self.ngram)
        if sh:
            m.update_batch(list(sh))
        return m

    def query(self, text: str, signature=None) -> tuple[str, float] | None:
        """The earliest indexed document whose estimated Jaccard with `text` is >= threshold."""
        m = signature if signature is not None else self.signature(text)
        best = None
        for key in self.lsh.query(m):
            j = m.jaccard(self.signatures[key])
            if j >= self.threshold and (best is None or self.order[key] < self.order[best[0]]):
                best = (key, j)
        return best

    def add(self, doc_id: str, text: str) -> tuple[str, float] | None:
        """Index `doc_id` unless it is a near duplicate of an indexed document; then return `(twin, jaccard)`."""
        return self.add_signature(doc_id, self.signature(text))

    def from_hashvalues(self, hashvalues):
        """A signature computed elsewhere (another process, a shard on disk), from its hash values."""
        scheme = self._MinHash(num_perm=self.num_perm, seed=self.seed).scheme  # the scheme `signature` uses
        return self._MinHash(num_perm=self.num_perm, seed=self.seed, hashvalues=hashvalues, scheme=scheme)

    def add_signature(self, doc_id: str, m) -> tuple[str, float] | None:
        """`add` with the document's signature already computed."""
        hit = self.query("", m)
        if hit is None:
            self.lsh.insert(doc_id, m)
            self.signatures[doc_id] = m
            self.order[doc_id] = len(self.order)
        return hit


class NgramContamination:
    """Word n-grams of evaluation text; `matches(text)` counts the ones a training document shares."""

    def __init__(self, eval_texts: Iterable[str], n: int = 13) -> None:
        if n < 1:
            raise CelerisError(f"the decontamination n-gram size must be >= 1, got {n}")
        self.n = n
        grams: set[int] = set()
        for t in eval_texts:
            grams.update(self._hashes(words(t)))
        self.grams = grams

    def _hashes(self, w: Sequence[str]) -> Iterable[int]:
        n = self.n
        return (hash(tuple(w[i : i + n])) for i in range(len(w) - n + 1))

    def drop_common(self, texts: Iterable[str], max_doc_freq: int) -> int:
        """Forget evaluation n-grams found in more than `max_doc_freq` of `texts` (shared boilerplate
        such as licence headers or `self.assertEqual(...)` idioms, not a leaked passage); returns how many."""
        df: Counter[int] = Counter()
        for t in texts:
            df.update({h for h in self._hashes(words(t)) if h in self.grams})
        common = {h for h, c in df.items() if c > max_doc_freq}
        self.grams -= common
        return len(common)

    def matches(self, text: str) -> int:
        if not self.grams:
            return 0
        return sum(h in self.grams for h in self._hashes(words(text)))


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact Jaccard similarity of two documents' word-n-gram sets (for tests and reports)."""
    sa, sb = shingles(a, ngram), shingles(b, ngram)
    return len(sa & sb) / max(1, len(sa | sb))


__all__ = ["NearDuplicateIndex", "NgramContamination", "check_threshold", "exact_hash", "jaccard", "normalise",
           "shingles", "words"]
