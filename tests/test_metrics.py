"""Couplet metrics on hand-made examples."""

from __future__ import annotations


import pytest
import sacrebleu

from couplet.evaluation.metrics import (
    compute_metrics,
    copies,
    corpus_bleu,
    pos_class,
    pos_matches,
    pos_words,
    punct_match,
    repetition_match,
    reuse,
    span_tag,
    structure_metrics,
    tone_opposition,
    tone_rule,
    word_boundaries,
)
from couplet.decoding.constraints import PING, ZE, char_tone

WRITER_KEYS = ("reuse_rate", "reuse_char_rate", "tone_opposition", "tone_positions", "pos_parallel", "pos_words")


def test_repetition_structure_both_ways():
    assert repetition_match("一一二", "三三四")  # 叠字 answered by 叠字
    assert not repetition_match("一一二", "三四五")  # 叠字 lost
    assert not repetition_match("一二三", "四四五")  # distinct made equal
    assert repetition_match("山山水水", "风风雨雨")
    assert not repetition_match("山水", "风雨云")  # length differs


def test_copies_ignore_punctuation():
    assert copies("春风，明月", "春雨，清风") == (1, 4)
    assert copies("天地", "山水") == (0, 2)


def test_punctuation_positions():
    assert punct_match("春风，明月", "秋雨，清风")
    assert punct_match("春风，明月", "秋雨；清风")  # same position, another mark
    assert not punct_match("春风，明月", "秋雨清风，")
    assert not punct_match("春风明月", "秋雨，风")


def test_tone_rule():
    assert tone_rule("江山明月", "湖海清风") is True  # 月 仄 -> 风 平
    assert tone_rule("江山明月", "湖海清雨") is False  # 雨 仄
    assert tone_rule("明月江山", "清风湖海") is None  # 山 平: rule does not apply
    assert tone_rule("江山明月。", "湖海清风。") is True  # the final mark is skipped
    assert tone_rule("江山明月", "湖海风") is False  # length mismatch


def test_word_boundaries():
    assert word_boundaries("春风得意马蹄疾") == frozenset({4})  # 春风得意 | 马蹄疾
    assert word_boundaries("") == frozenset()


def test_bleu_is_character_level():
    refs, hyps = ["秋月扬辉犬吠声", "海阔凭鱼跃"], ["秋月扬辉鸡鸣声", "海阔凭鱼跃"]
    expected = sacrebleu.corpus_bleu([" ".join(h) for h in hyps], [[" ".join(r) for r in refs]], tokenize="none").score
    assert corpus_bleu(refs, hyps) == pytest.approx(expected)
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)


def test_compute_metrics_on_hand_made_lines():
    uppers = ["晚风摇树树还挺", "天天向上", "春风，明月"]
    references = ["晨露润花花更红", "日日维新", "秋雨，清风"]
    predictions = ["晨露润花花更红", "天天向下", "秋雨清风，"]
    m = compute_metrics(uppers, references, predictions)
    assert m["n"] == 3
    assert m["exact_match"] == pytest.approx(1 / 3)
    correct = 7 + 0 + 2  # line 2 shares nothing; line 3 matches 秋雨
    assert m["char_accuracy"] == pytest.approx(correct / 16)
    assert m["length_match"] == 1.0
    assert m["punct_match"] == pytest.approx(2 / 3)
    assert m["repetition_match"] == 1.0  # every line keeps its 叠字 / distinct structure
    assert m["copy_rate"] == pytest.approx(3 / 15)  # 天天向 copied; 15 non-punct positions
    assert m["copy_line_rate"] == pytest.approx(1 / 3)
    assert m["tone_applicable"] == 3  # 挺 (ting3), 上 (shang4), 月 (yue4) all end in 仄
    assert m["tone_rate"] == pytest.approx(1 / 3)  # only 红 (hong2) answers with 平
    refs = m["references"]
    assert refs["length_match"] == 1.0 and refs["punct_match"] == 1.0
    assert refs["repetition_match"] == 1.0 and refs["copy_rate"] == 0.0
    assert refs["tone_rate"] == 1.0  # 红, 新, 风
    assert compute_metrics(["天天"], ["年年"], ["年月"])["repetition_match"] == 0.0
    assert 0.0 <= m["boundary_f1"] <= 1.0 and 0.0 <= m["boundary_exact"] <= 1.0


def test_tone_applicable_counts():
    s = structure_metrics(["江山明月", "明月江山", "高山流水"], ["湖海清风", "清风湖海", "明月清雨"])
    assert s["tone_applicable"] == 2  # 月, 水
    assert s["tone_rate"] == pytest.approx(0.5)


def test_length_mismatch_fails_structure_but_does_not_crash():
    m = compute_metrics(["天地人"], ["山水云"], ["山水"])
    assert m["length_match"] == 0.0 and m["punct_match"] == 0.0 and m["repetition_match"] == 0.0
    assert m["char_accuracy"] == pytest.approx(2 / 3)
    assert m["boundary_exact"] == 0.0


def test_unequal_inputs_and_empty():
    with pytest.raises(ValueError, match="equally many"):
        compute_metrics(["天"], ["地"], [])
    m = compute_metrics([], [], [])
    assert m["n"] == 0 and m["bleu"] == 0.0


def test_ideograph_accuracy_ignores_punctuation_positions():
    uppers = ["春风，明月。", "天地"]
    refs = ["秋雨，清风。", "山水"]
    preds = ["秋雨，白云。", "山川"]  # 2 of 4 and 1 of 2 ideograph positions right; the marks are always right
    m = compute_metrics(uppers, refs, preds)
    assert m["ideograph_positions"] == 6 and m["ideograph_accuracy"] == pytest.approx(3 / 6)
    assert m["char_accuracy"] == pytest.approx(5 / 8)  # the copied marks flatter character accuracy
    keys = list(m)
    assert keys.index("ideograph_accuracy") == keys.index("char_accuracy") + 1  # printed side by side
    short = compute_metrics(["天地人"], ["山水风"], ["山"])  # a missing position counts as wrong
    assert short["ideograph_accuracy"] == pytest.approx(1 / 3)
    assert compute_metrics([], [], [])["ideograph_accuracy"] == 0.0


def test_is_ideograph_shares_the_validation_ranges():
    from couplet.data import validate
    from couplet.data.punct import CJK_RANGES, is_ideograph

    assert validate.CJK_RANGES is CJK_RANGES
    assert is_ideograph("春") and is_ideograph("\U00020000") and is_ideograph("\u3400")
    assert not any(is_ideograph(ch) for ch in "，。a1 ")


# --------------------------------------------------------------------------- what couplet writers judge by


def test_reuse_anywhere_in_the_lower_line():
    assert reuse("白日依山尽", "黄河入海流") == (0, 5)
    assert reuse("春风，明月", "秋雨，清风") == (1, 4)  # 风 reused at another position; marks are not ideographs
    assert reuse("天天向上", "天天向下") == (3, 4)  # same-position copies count too
    s = structure_metrics(["白日依山尽", "春风，明月"], ["黄河入海流", "秋雨，清风"])
    assert s["reuse_rate"] == pytest.approx(1 / 2)
    assert s["reuse_char_rate"] == pytest.approx(1 / 9)
    assert structure_metrics(["天地人"], ["人"])["reuse_rate"] == 1.0  # not positional: any length


def test_tone_opposition_at_even_positions_by_hand():
    # pypinyin: 白 bai2 日 ri4 依 yi1 山 shan1 尽 jin3 / 黄 huang2 河 he2 入 ru4 海 hai3 流 liu2
    assert [char_tone(c) for c in "日山河海"] == [ZE, PING, PING, ZE]
    assert tone_opposition("白日依山尽", "黄河入海流") == (2, 2)  # 日/河 and 山/海 opposed
    assert [char_tone(c) for c in "月风雨"] == [ZE, PING, ZE]
    assert tone_opposition("江山明月", "湖海清风") == (2, 2)
    assert tone_opposition("江山明月", "湖河清雨") == (0, 2)  # 山/河 both 平, 月/雨 both 仄
    # positions restart after punctuation: the 2nd of each clause is 风/雨 and 月/风
    assert tone_opposition("春风，明月", "秋雨，清风") == (2, 2)
    assert tone_opposition("江山明月", "湖海") == (0, 2)  # lengths differ: compared, none opposed
    s = structure_metrics(["白日依山尽", "江山明月"], ["黄河入海流", "湖河清雨"])
    assert s["tone_positions"] == 4 and s["tone_opposition"] == pytest.approx(2 / 4)


def test_final_tone_rule_is_kept():
    s = structure_metrics(["白日依山尽"], ["黄河入海流"])  # 尽 jin3 仄 -> 流 liu2 平
    assert s["tone_applicable"] == 1 and s["tone_rate"] == 1.0


def test_pos_classes():
    assert [pos_class(t) for t in ("n", "ns", "nr", "t", "f", "s")] == ["noun"] * 6
    assert [pos_class(t) for t in ("v", "vn", "a", "ad", "d", "m", "mq", "q", "r", "rr")] == [
        "verb", "verb", "adj", "adj", "adv", "num", "num", "num", "pron", "pron"
    ]
    assert pos_class("c") == pos_class("p") == pos_class("x") == "other"


def test_pos_parallel_by_hand():
    # jieba.posseg (no HMM): 白日/t 依/d 山/n 尽/v ; the lower characters at those positions,
    # each tagged as one string: 黄河/ns 入/v 海/n 流/n
    assert pos_words("白日依山尽") == ((0, 2, "t"), (2, 3, "d"), (3, 4, "n"), (4, 5, "v"))
    assert [span_tag(w) for w in ("黄河", "入", "海", "流")] == ["ns", "v", "n", "n"]
    assert pos_matches("白日依山尽", "黄河入海流") == (2, 4)  # noun/noun twice; adv/verb and verb/noun differ
    assert pos_matches("春风，明月", "秋雨，清风") == (2, 2)  # the comma is no word
    assert pos_matches("白日依山尽", "黄河") == (1, 4)  # only 白日/黄河 has a counterpart
    s = structure_metrics(["白日依山尽", "春风，明月"], ["黄河入海流", "秋雨，清风"])
    assert s["pos_words"] == 6 and s["pos_parallel"] == pytest.approx(4 / 6)


def test_writer_metrics_empty_and_in_compute_metrics():
    empty = structure_metrics([], [])
    assert all(empty[k] == 0 for k in WRITER_KEYS)
    m = compute_metrics(["白日依山尽", "天天向上"], ["黄河入海流", "日日维新"], ["黄河入海流", "天天向下"])
    for k in WRITER_KEYS + ("repetition_match", "tone_rate"):
        assert k in m and k in m["references"]
    for k in ("reuse_rate", "reuse_char_rate", "tone_opposition", "pos_parallel"):
        assert 0.0 <= m[k] <= 1.0
    assert m["reuse_rate"] == pytest.approx(1 / 2) and m["references"]["reuse_rate"] == 0.0
    assert m["reuse_char_rate"] == pytest.approx(3 / 9)
    assert compute_metrics([], [], [])["pos_parallel"] == 0.0
