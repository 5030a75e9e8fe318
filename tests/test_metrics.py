"""Couplet metrics on hand-made examples."""

from __future__ import annotations


import pytest
import sacrebleu

from couplet.evaluation.metrics import (
    compute_metrics,
    copies,
    corpus_bleu,
    punct_match,
    repetition_match,
    structure_metrics,
    tone_rule,
    word_boundaries,
)


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
