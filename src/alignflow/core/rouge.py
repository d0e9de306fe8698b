"""Fast, exact ROUGE-L near-duplicate filtering (the Self-Instruct ``filter`` rule).

A candidate instruction is dropped when its ROUGE-L F-measure against ANY
instruction kept before it is above the threshold (0.7); otherwise it is kept.

How this stays exact (the decisions equal a brute-force ``rouge_score`` run):

* ``tokenize`` reproduces ``rouge_score``'s ``DefaultTokenizer(use_stemmer=False)``
  (``str.lower()``, then maximal runs of ``[a-z0-9]``), and in addition makes
  every CJK character a token of its own (rouge_score drops them all).
* ``rouge_l_f`` computes precision, recall and the F-measure with the very same
  floating-point expressions as ``rouge_score._score_lcs`` / ``scoring.fmeasure``;
  only the LCS length is computed differently (bit-parallel), and it is an
  integer, so the result is identical.
* Pruning only skips a kept item when an upper bound on its score is below the
  threshold by a safety margin (``_EPS``), so no pair that could score above the
  threshold is ever skipped. The bounds are (a) length: LCS <= min(m, n), and
  (b) token overlap: LCS <= sum over tokens of min(count_a, count_b).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

# The CJK characters, the project's one definition (ROUGE tokens here; the rules judge's language_of and the
# filter's blacklist import it): Hiragana, Katakana, CJK Unified Ideographs Ext. A, CJK Unified Ideographs,
# Hangul syllables, CJK Compatibility Ideographs; all in the BMP (Ext. B and later, U+20000 up, are not).
CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
CJK = re.compile(f"[{CJK_RANGES}]")
# rouge_score lowercases, then keeps runs of [a-z0-9]. We also emit each CJK character alone.
_TOKEN_RE = re.compile(f"[a-z0-9]+|[{CJK_RANGES}]")
# Float-rounding margin for the bounds: a bound this close to the threshold is
# not trusted and the pair is scored exactly instead.
_EPS = 1e-9


def has_cjk(text: str) -> bool:
    """Whether ``text`` holds a CJK character (``CJK``)."""
    return CJK.search(text) is not None


def tokenize(text: str) -> list[str]:
    """Split ``text`` into ROUGE tokens (rouge_score's, plus one per CJK char)."""
    return _TOKEN_RE.findall(text.lower())


def _position_masks(seq: Sequence) -> dict:
    """Map each token of ``seq`` to a bitmask (Python int) of its positions."""
    masks: dict = {}
    for i, tok in enumerate(seq):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    return masks


def _lcs_from_masks(masks: dict, length: int, other: Iterable) -> int:
    """Bit-parallel LCS (Allison-Dix / Hyyro) of a pattern and ``other``.

    ``masks``/``length`` describe the pattern. ``v`` has a 1 bit for every
    pattern position not yet "used" by the LCS; each step of ``other`` turns
    at most one 1 into a 0 per run, so LCS = number of 0 bits at the end.
    """
    full = (1 << length) - 1
    v = full
    for tok in other:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full  # mask drops the carry out of the top bit
    return length - v.bit_count()


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token sequences."""
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    if not short:
        return 0
    return _lcs_from_masks(_position_masks(short), len(short), long_)


def _f_from_lcs(lcs: int, target_len: int, prediction_len: int) -> float:
    """The F-measure with the exact expressions of rouge_score (see module doc)."""
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l_f(a_tokens: Sequence, b_tokens: Sequence) -> float:
    """ROUGE-L F-measure, == ``RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure``.

    ``a`` plays rouge_score's *target*, ``b`` its *prediction*; the value is in
    fact symmetric (2*p is exact, so 2*p*r == 2*r*p bit for bit).
    """
    lcs = lcs_length(a_tokens, b_tokens)
    return _f_from_lcs(lcs, len(a_tokens), len(b_tokens))


class _Growable:
    """A numpy array with amortised O(1) append (capacity doubling)."""

    def __init__(self, dtype=np.int32):
        self.data = np.empty(8, dtype=dtype)
        self.size = 0

    def append(self, value) -> None:
        if self.size == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        self.data[self.size] = value
        self.size += 1

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class NearDuplicateFilter:
    """Order-dependent ROUGE-L dedup: keep an item unless a kept one scores > threshold.

    ``add`` returns ``(kept, score, match)``: ``match`` is the index (in the
    order of ``add`` / ``add_unchecked`` calls) of a kept item scoring above the
    threshold, or None. ``score`` is that item's score when dropped, else the best
    score among the pairs actually scored (pruned pairs are known to be <= threshold).
    ``add_unchecked`` keeps an item without comparing it (Self-Instruct's seeds:
    every one is in the pool, however close two of them are).
    """

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self._vocab: dict[str, int] = {}  # token -> int id, assigned once
        self._kept_ids: list[list[int]] = []  # token ids of each kept item
        self._kept_index: list[int] = []  # kept slot -> index of its add() call
        self._lengths = _Growable()
        self._postings: dict[int, tuple[_Growable, _Growable]] = {}  # tok -> (slots, counts)
        self._n_added = 0
        # pair counts: pairs, length_pruned, overlap_pruned, survivors, lcs
        self.stats: Counter = Counter()

    def _ids(self, text: str) -> list[int]:
        vocab = self._vocab
        return [vocab.setdefault(t, len(vocab)) for t in tokenize(text)]

    def _candidate_slots(self, ids: list[int]) -> np.ndarray:
        """Kept slots whose bounds allow a score above the threshold, best first."""
        m, lengths = len(ids), self._lengths.view()
        limit = self.threshold - _EPS
        self.stats["pairs"] += len(lengths)
        denom = (lengths + m).astype(np.float64)
        length_ok = 2.0 * np.minimum(lengths, m) / denom > limit  # bound (a)
        self.stats["length_pruned"] += len(lengths) - int(length_ok.sum())
        # Bound (b) via an inverted index; measured faster than slicing a
        # scipy.sparse CSC matrix (~190 vs ~245 us/query at 10k kept items).
        overlap = np.zeros(len(lengths), dtype=np.int32)
        for tok, count in Counter(ids).items():
            if tok in self._postings:
                slots, counts = (g.view() for g in self._postings[tok])
                overlap[slots] += np.minimum(counts, count)
        bound = 2.0 * overlap / denom
        ok = length_ok & (bound > limit)
        self.stats["overlap_pruned"] += int(length_ok.sum() - ok.sum())
        slots = np.flatnonzero(ok)
        self.stats["survivors"] += len(slots)
        return slots[np.argsort(-bound[slots], kind="stable")]

    def _keep(self, ids: list[int]) -> None:
        slot = len(self._kept_ids)
        self._kept_ids.append(ids)
        self._kept_index.append(self._n_added)
        self._lengths.append(len(ids))
        for tok, count in Counter(ids).items():
            if tok not in self._postings:
                self._postings[tok] = (_Growable(), _Growable())
            slots, counts = self._postings[tok]
            slots.append(slot)
            counts.append(count)

    def add_unchecked(self, text: str) -> int:
        """Keep ``text`` whatever it scores against the kept items; returns its index."""
        self._keep(self._ids(text))
        self._n_added += 1
        return self._n_added - 1

    def add(self, text: str) -> tuple[bool, float, int | None]:
        """Offer ``text``; keep it unless a kept item scores above the threshold."""
        ids = self._ids(text)
        best, match = 0.0, None
        if ids:  # no tokens: F is 0 against anything, never a duplicate
            m, masks = len(ids), _position_masks(ids)
            order = self._candidate_slots(ids)
            for slot in order:
                other = self._kept_ids[slot]
                self.stats["lcs"] += 1
                if m <= len(other):  # pattern = the shorter sequence
                    lcs = _lcs_from_masks(masks, m, other)
                else:
                    lcs = _lcs_from_masks(_position_masks(other), len(other), ids)
                score = _f_from_lcs(lcs, m, len(other))
                best = max(best, score)
                if score > self.threshold:
                    match = self._kept_index[slot]
                    break
        if match is None:
            self._keep(ids)
        self._n_added += 1
        return match is None, best, match


def filter_near_duplicates(
    texts: Iterable[str], threshold: float = 0.7, progress: bool = True
) -> list[tuple[bool, float, int | None]]:
    """Run ``NearDuplicateFilter`` over ``texts`` in order; one result per text."""
    flt = NearDuplicateFilter(threshold)
    if progress:
        from tqdm.auto import tqdm

        texts = tqdm(texts, desc="rouge-L dedup", unit="inst")
    return [flt.add(t) for t in texts]
