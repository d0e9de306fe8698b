"""Exactness tests for alignflow.core.rouge against rouge_score and a plain DP LCS."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer, tokenizers

from alignflow.core import rouge
from conftest import SHARED_SEEDS as SEED_PATH
RS_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@pytest.fixture(scope="module")
def seed_tasks() -> list[dict]:
    with open(SEED_PATH, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def dp_lcs(a, b) -> int:
    """Plain O(mn) dynamic-programming LCS length (reference)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def reference_f(target, prediction) -> float:
    """rouge_score's F-measure formula on top of the DP LCS."""
    return rouge_scorer._score_lcs(target, prediction).fmeasure


# ---------------------------------------------------------------- (a) tokenizer

TRICKY = [
    "Hello, World! It's 3:45pm -- don't panic.",
    "snake_case_name and kebab-case-name; CamelCaseName",
    "Café naïve résumé Über façade coöperate",
    "İstanbul, the Kelvin sign \u212a, ﬁnance (ligature), ß",
    "e-mail: foo.bar@example.com, url https://x.y/z?a=1&b=2",
    "1,000,000 3.14159 -42 1e10 0x1F",
    "tabs\tand\nnewlines\r\nand   spaces",
    "quotes ‘curly’ “double” «guillemets» — dashes – too…",
    "",
    "   ",
    "!!!???",
    "x²  ½  Ⅻ  ①  ٣  ３",
]


def is_cjk(token: str) -> bool:
    return len(token) == 1 and not ("a" <= token <= "z" or "0" <= token <= "9")


def test_tokenize_matches_rouge_score_on_tricky_strings():
    for text in TRICKY:
        assert rouge.tokenize(text) == RS_TOKENIZER.tokenize(text), text


def test_tokenize_matches_rouge_score_on_seed_tasks(seed_tasks):
    texts = [t["instruction"] for t in seed_tasks]
    texts += [i["input"] for t in seed_tasks for i in t["instances"]]
    texts += [i["output"] for t in seed_tasks for i in t["instances"]]
    n_same = 0
    for text in texts:
        ours, theirs = rouge.tokenize(text), RS_TOKENIZER.tokenize(text)
        # Texts with CJK (a few seed outputs are Chinese) differ only by the
        # extra one-character CJK tokens, which rouge_score treats as separators.
        assert [t for t in ours if not is_cjk(t)] == theirs, text
        n_same += ours == theirs
    assert n_same > 300


def test_tokenize_cjk_characters_are_single_tokens():
    assert rouge.tokenize("我爱北京abc天安门") == ["我", "爱", "北", "京", "abc", "天", "安", "门"]
    assert rouge.tokenize("ひらがな カタカナ 한국어") == list("ひらがなカタカナ한국어")
    assert rouge.tokenize("\u3400\u4dbf\uf900") == ["\u3400", "\u4dbf", "\uf900"]


def test_cjk_is_what_the_tokenizer_splits():
    """One definition of CJK (rouge.CJK, used by the judges and the filter): a character is CJK iff the
    tokenizer makes it a token of its own; CJK Ext. B (U+20000) and the Yijing hexagrams are not."""
    for char in "我愛ひカ한\u3400\uf900\ufa6e\U00020000\u4dc0\u2e80a1 .。":
        assert rouge.has_cjk(char) is (rouge.tokenize(char) == [char] and not char.isascii()), hex(ord(char))
    assert rouge.has_cjk("The 地图 file") and not rouge.has_cjk("Café, naïve")


# ------------------------------------------------------------ (b) rouge_l_f exact


def test_rouge_l_f_equals_rouge_score_on_seed_pairs(seed_tasks):
    insts = [t["instruction"] for t in seed_tasks[:60]]
    toks = [rouge.tokenize(s) for s in insts]
    for i, target in enumerate(insts):
        for j, prediction in enumerate(insts):
            expected = SCORER.score(target, prediction)["rougeL"].fmeasure
            assert rouge.rouge_l_f(toks[i], toks[j]) == expected, (target, prediction)


def test_argument_order_follows_rouge_score():
    # Unequal lengths: precision / recall differ, F must still match exactly.
    target, prediction = "a b c d e f g", "a c x"
    score = SCORER.score(target, prediction)["rougeL"]
    assert score.precision == 2 / 3 and score.recall == 2 / 7
    assert rouge.rouge_l_f(target.split(), prediction.split()) == score.fmeasure
    assert rouge.rouge_l_f(prediction.split(), target.split()) == score.fmeasure


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from("abcd"), max_size=40),
    st.lists(st.sampled_from("abcd"), max_size=40),
)
def test_lcs_and_f_match_dp(a, b):
    assert rouge.lcs_length(a, b) == dp_lcs(a, b)
    assert rouge.rouge_l_f(a, b) == reference_f(a, b)


def test_lcs_long_sequences_cross_word_boundaries():
    rng = random.Random(0)
    a = [rng.choice("xyz") for _ in range(150)]
    b = [rng.choice("xyz") for _ in range(97)]
    assert rouge.lcs_length(a, b) == dp_lcs(a, b)
    assert rouge.lcs_length(b, a) == dp_lcs(a, b)


def test_empty_token_lists_score_zero():
    assert rouge.rouge_l_f([], []) == 0.0
    assert rouge.rouge_l_f([], ["a"]) == 0.0 == reference_f([], ["a"])
    assert rouge.rouge_l_f(["a"], ["b"]) == 0.0 == reference_f(["a"], ["b"])


# ---------------------------------------------------------------- (c) Chinese

ZH = "今天天气很好我们去公园"[:10]  # 10 characters


def test_chinese_identical_and_one_char_edit():
    assert len(ZH) == 10
    assert RS_TOKENIZER.tokenize(ZH) == []  # rouge_score sees nothing
    assert SCORER.score(ZH, ZH)["rougeL"].fmeasure == 0
    assert rouge.rouge_l_f(rouge.tokenize(ZH), rouge.tokenize(ZH)) == 1.0
    substituted = ZH[:4] + "坏" + ZH[5:]  # LCS 9 of 10 and 10: P = R = 0.9
    f_sub = rouge.rouge_l_f(rouge.tokenize(ZH), rouge.tokenize(substituted))
    assert f_sub == pytest.approx(0.9, abs=1e-12)
    deleted = ZH[:4] + ZH[5:]  # LCS 9 of 10 and 9: F = 2*9/19
    f_del = rouge.rouge_l_f(rouge.tokenize(ZH), rouge.tokenize(deleted))
    assert f_del == pytest.approx(18 / 19, abs=1e-12)
    assert f_del == reference_f(list(ZH), list(deleted))


# ---------------------------------------------------- (d) filter == brute force


def mutate(words: list[str], vocab: list[str], rng: random.Random) -> list[str]:
    """Apply 0-4 random word deletions / substitutions / insertions / swaps."""
    words = list(words)
    for _ in range(rng.randint(0, 4)):
        op, i = rng.random(), rng.randrange(max(len(words), 1))
        if op < 0.3 and len(words) > 1:
            del words[i]
        elif op < 0.6 and words:
            words[i] = rng.choice(vocab)
        elif op < 0.85:
            words.insert(i, rng.choice(vocab))
        elif len(words) > 1:
            j = min(i + 1, len(words) - 1)
            words[i], words[j] = words[j], words[i]
    return words


def synthetic(bases: list[str], n: int, seed: int, sep: str = " ") -> list[str]:
    rng = random.Random(seed)
    split = (lambda s: s.split()) if sep == " " else list
    vocab = sorted({w for b in bases for w in split(b)})
    return [sep.join(mutate(split(rng.choice(bases)), vocab, rng)) for _ in range(n)]


def brute_force(token_lists, threshold=0.7, score=reference_f) -> list[bool]:
    """Keep iff no previously kept item scores > threshold; no pruning at all."""
    kept_tokens, decisions = [], []
    for toks in token_lists:
        dup = any(score(toks, other) > threshold for other in kept_tokens)
        decisions.append(not dup)
        if not dup:
            kept_tokens.append(toks)
    return decisions


def check_filter(texts, ref_tokens):
    results = rouge.filter_near_duplicates(texts, progress=False)
    decisions = [kept for kept, _, _ in results]
    assert decisions == brute_force(ref_tokens)
    assert 0 < sum(decisions) < len(decisions) * 0.8  # non-trivial: both outcomes
    for i, (kept, score, match) in enumerate(results):
        if not kept:  # a drop must point at an earlier kept item with that score
            assert match < i and decisions[match]
            assert score == reference_f(ref_tokens[i], ref_tokens[match]) > 0.7
        else:
            assert match is None and score <= 0.7


def test_filter_equals_brute_force_rouge_score(seed_tasks):
    bases = [t["instruction"] for t in seed_tasks[:40]]
    texts = synthetic(bases, 300, seed=1) + ["", "!!!"]
    check_filter(texts, [RS_TOKENIZER.tokenize(t) for t in texts])


def test_filter_equals_brute_force_chinese():
    bases = ["请写一首关于秋天的诗", "把下面的句子翻译成英文", "给出三个健康早餐的建议",
             "总结这篇文章的主要观点", "解释什么是机器学习"]
    texts = synthetic(bases, 150, seed=2, sep="")
    check_filter(texts, [list(t) for t in texts])


def test_add_unchecked_keeps_a_near_duplicate():
    flt = rouge.NearDuplicateFilter(0.7)
    assert flt.add_unchecked("Write a conversation based on the given facts.") == 0
    assert flt.add_unchecked("Write a cover letter based on the given facts.") == 1  # F 0.82 against 0: kept anyway
    kept, score, match = flt.add("Write a cover letter for the given facts.")
    assert (kept, match) == (False, 1) and score == pytest.approx(14 / 17)
    assert flt.add("Plan a three-day trip to the mountains.") == (True, 0.0, None)
    assert flt.add_unchecked("") == 4  # no tokens: kept, indices still count every call


# ------------------------------------------------------ (e) threshold boundary


def test_score_exactly_at_threshold_is_kept():
    a = "Give me a list of ten fruits that are red"
    b = "Give a list of 10 red fruits that are sweet"
    assert SCORER.score(a, b)["rougeL"].fmeasure == 0.7  # exactly the threshold
    results = rouge.filter_near_duplicates([a, b], progress=False)
    assert results[1] == (True, 0.7, None)
    assert rouge.filter_near_duplicates([a, b + " " + "x"], threshold=0.6,
                                        progress=False)[1][0] is False
