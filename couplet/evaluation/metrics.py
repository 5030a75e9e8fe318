"""Couplet metrics over lists of (upper, reference, prediction).

`compute_metrics` returns a flat dict (JSON-ready):

Accuracy against the reference lower line (下联):
- `char_accuracy`: matching characters at the same position / reference characters;
- `ideograph_accuracy`: the same over the positions whose upper character is a CJK ideograph
  (`couplet.data.punct.is_ideograph`), so punctuation -- copied in place by the decoder, hence always
  right -- does not flatter punctuated data (`ideograph_positions` of them were scored);
- `exact_match`: share of lines predicted exactly;
- `bleu`: sacrebleu corpus BLEU (0-100) over characters. Both sides are written as characters
  separated by spaces and scored with `tokenize="none"`, so every character (Han, punctuation or
  other) is one token and nothing depends on sacrebleu's Chinese tokenizer rules.

Couplet structure of the predictions (each a rate in [0, 1]; the same keys computed for the
references are under `references`, so a reader sees what real couplets score):
- `length_match`: len(lower) == len(upper);
- `punct_match`: punctuation at exactly the same positions (the marks may differ);
- `repetition_match`: for all i < j, upper[i] == upper[j]  <=>  lower[i] == lower[j];
- `copy_rate`: share of non-punctuation positions with lower[i] == upper[i] (the decoder keeps
  this at 0); `copy_line_rate`: share of lines with at least one such copy;
- `tone_rate`: among lines whose upper line ends in a 仄 tone (`tone_applicable` of them), the
  share whose lower line ends in a 平 tone at the same position (tones as in `couplet.decoding.constraints`:
  pypinyin TONE3 default reading of the character alone; "ends" = last non-punctuation character);
- `boundary_exact`: share of lines whose jieba word boundaries (the offsets between words,
  excluding 0 and the line length) are identical for upper and lower;
- `boundary_f1`: mean over lines of the F1 between the two boundary sets (upper's boundaries
  as reference; a line where both have no inner boundary scores 1).
- `reuse_rate`: share of lines whose lower line contains, anywhere, an ideograph of its upper line
  (不重字 broken; same-position copies included); `reuse_char_rate`: share of the lower lines'
  ideographs that occur in their upper line (over all lines' lower ideographs);
- `tone_opposition`: over the even positions (2nd, 4th, 6th ... character, 1-based, counted within each
  clause of the upper line -- punctuation starts a new clause) whose upper and lower characters are
  both ideographs with a known tone (`tone_positions` of them), the share where the tones are
  opposite (平 vs 仄). In a line whose lengths differ, each even upper position with a known tone
  counts as compared and not opposed;
- `pos_parallel`: part-of-speech parallelism. The upper line is segmented and tagged by
  `jieba.posseg`; for each upper word containing an ideograph (`pos_words` of them) the lower
  characters at the same positions are tagged by `jieba.posseg` as one string (a dictionary word's
  own tag; otherwise the tag of the longest piece jieba cuts it into, the last one on a tie), and both
  tags are mapped to a coarse class: noun (n*, and the nominal t time / s place / f locative words),
  verb (v*), adjective (a*), adverb (d), numeral (m*, q), pronoun (r*), other. The rate is matching
  classes / upper words. jieba runs without its HMM (whose tag Viterbi cost ~1.6 ms per unknown run:
  10 s instead of 0.4 s per 4,000 lines); unknown runs fall apart into dictionary characters. Tags are
  cached per string for the process, so scoring the model and each baseline on the same upper lines
  segments them once. `pos_words` and `pos_class` are couplet/data/wordtags.py's, which the labeller's word
  features (model.word_features) read too.
Lines whose lengths differ fail every positional structure check.

Limits. Tones are the modern Mandarin reading (pypinyin's default reading of the character alone):
the old entering tone (入声) is read as 平 for many characters (e.g. 白, 竹, 国), and polyphonic
characters get their most common reading, so `tone_rate` and `tone_opposition` are approximate.
jieba is trained on modern prose: its segmentation and tags of short poetic lines, and of the lower
characters tagged out of context, are noisy, so `pos_parallel` (and `boundary_*`) compare
systems on the same lines rather than judge one line.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from couplet.decoding.constraints import PING, ZE, char_tone, final_position
from couplet.data.punct import is_ideograph, is_punct
from couplet.data.wordtags import jieba_module, pos_class, pos_words, posseg_module


def word_boundaries(line: str, cache: dict[str, frozenset[int]] | None = None) -> frozenset[int]:
    """Inner word-boundary offsets of `line` under jieba's default (precise) segmentation."""
    if cache is not None and line in cache:
        return cache[line]
    offsets = []
    pos = 0
    for word in jieba_module().cut(line, HMM=True):
        pos += len(word)
        offsets.append(pos)
    result = frozenset(offsets[:-1])
    if cache is not None:
        cache[line] = result
    return result


@lru_cache(maxsize=1 << 17)
def span_tag(text: str) -> str:
    """One jieba tag for `text` read as one string: its dictionary tag if it is a dictionary word,
    else the tag of the longest word jieba cuts it into (the last on a tie)."""
    ps = posseg_module()
    tag = ps.dt.word_tag_tab.get(text)
    if tag is not None:
        return tag
    best, best_len = "x", 0
    for pair in ps.cut(text, HMM=False):
        if len(pair.word) >= best_len:
            best, best_len = pair.flag, len(pair.word)
    return best


def pos_matches(upper: str, lower: str) -> tuple[int, int]:
    """(upper words whose lower counterpart has the same coarse class, upper words with an ideograph)."""
    matched = words = 0
    for start, end, tag in pos_words(upper):
        if not any(is_ideograph(ch) for ch in upper[start:end]):
            continue
        words += 1
        piece = lower[start:end]
        if len(piece) == end - start and pos_class(span_tag(piece)) == pos_class(tag):
            matched += 1
    return matched, words


def reuse(upper: str, lower: str) -> tuple[int, int]:
    """(lower ideographs that occur in the upper line, lower ideographs)."""
    seen = set(upper)
    reused = total = 0
    for ch in lower:
        if is_ideograph(ch):
            total += 1
            reused += ch in seen
    return reused, total


def tone_opposition(upper: str, lower: str) -> tuple[int, int]:
    """(opposed, compared) over the even positions (1-based, counted within each punctuation-delimited
    clause of the upper line) where both characters are ideographs with a known tone; a line whose
    lengths differ compares each such upper position with a known tone and opposes none."""
    same_len = len(upper) == len(lower)
    opposed = compared = 0
    k = 0  # position within the clause
    for i, a in enumerate(upper):
        if is_punct(a):
            k = 0
            continue
        k += 1
        if k % 2 or not is_ideograph(a):
            continue
        ta = char_tone(a)
        if ta is None:
            continue
        if not same_len:
            compared += 1
            continue
        b = lower[i]
        tb = char_tone(b) if is_ideograph(b) else None
        if tb is None:
            continue
        compared += 1
        opposed += ta != tb
    return opposed, compared


def punct_match(upper: str, lower: str) -> bool:
    return len(upper) == len(lower) and all(is_punct(a) == is_punct(b) for a, b in zip(upper, lower))


def repetition_match(upper: str, lower: str) -> bool:
    """upper[i] == upper[j] <=> lower[i] == lower[j] for every pair of positions."""
    if len(upper) != len(lower):
        return False
    # the structure matches iff the character-to-character map is a bijection on the pairs seen
    forward: dict[str, str] = {}
    backward: dict[str, str] = {}
    for a, b in zip(upper, lower):
        if forward.setdefault(a, b) != b or backward.setdefault(b, a) != a:
            return False
    return True


def copies(upper: str, lower: str) -> tuple[int, int]:
    """(same-position copies, non-punctuation positions compared)."""
    n = copied = 0
    for a, b in zip(upper, lower):
        if is_punct(a):
            continue
        n += 1
        copied += a == b
    return copied, n


def tone_rule(upper: str, lower: str) -> bool | None:
    """None if the rule does not apply (upper does not end in 仄); else whether lower ends in 平."""
    pos = final_position(upper)
    if pos is None or char_tone(upper[pos]) != ZE:
        return None
    if len(lower) != len(upper):
        return False
    return char_tone(lower[pos]) == PING


def _boundary_f1(ref: frozenset[int], hyp: frozenset[int]) -> float:
    if not ref and not hyp:
        return 1.0
    hit = len(ref & hyp)
    if hit == 0:
        return 0.0
    precision, recall = hit / len(hyp), hit / len(ref)
    return 2 * precision * recall / (precision + recall)


def structure_metrics(
    uppers: Sequence[str], lowers: Sequence[str], *, seg_cache: dict[str, frozenset[int]] | None = None
) -> dict[str, float | int]:
    """The couplet-structure rates of `lowers` against their `uppers` (see module doc)."""
    n = len(uppers)
    if n != len(lowers):
        raise ValueError(f"{n} upper lines but {len(lowers)} lower lines")
    cache = seg_cache if seg_cache is not None else {}
    length_ok = punct_ok = rep_ok = copy_lines = 0
    copied = compared = 0
    tone_applicable = tone_ok = 0
    boundary_exact = 0
    boundary_f1 = 0.0
    reuse_lines = reused_chars = lower_chars = 0
    opposed = tone_positions = 0
    pos_ok = pos_total = 0
    for upper, lower in zip(uppers, lowers):
        same_len = len(upper) == len(lower)
        length_ok += same_len
        punct_ok += punct_match(upper, lower)
        rep_ok += repetition_match(upper, lower)
        c, k = copies(upper, lower)
        copied += c
        compared += k
        copy_lines += c > 0
        rule = tone_rule(upper, lower)
        if rule is not None:
            tone_applicable += 1
            tone_ok += rule
        if same_len:
            bu = word_boundaries(upper, cache)
            bl = word_boundaries(lower, cache)
            boundary_exact += bu == bl
            boundary_f1 += _boundary_f1(bu, bl)
        r, t = reuse(upper, lower)
        reuse_lines += r > 0
        reused_chars += r
        lower_chars += t
        o, c = tone_opposition(upper, lower)
        opposed += o
        tone_positions += c
        m, w = pos_matches(upper, lower)
        pos_ok += m
        pos_total += w
    rate = (lambda x: x / n) if n else (lambda x: 0.0)
    return {
        "length_match": rate(length_ok),
        "punct_match": rate(punct_ok),
        "repetition_match": rate(rep_ok),
        "copy_rate": copied / compared if compared else 0.0,
        "copy_line_rate": rate(copy_lines),
        "tone_rate": tone_ok / tone_applicable if tone_applicable else 0.0,
        "tone_applicable": tone_applicable,
        "boundary_exact": rate(boundary_exact),
        "boundary_f1": rate(boundary_f1),
        "reuse_rate": rate(reuse_lines),
        "reuse_char_rate": reused_chars / lower_chars if lower_chars else 0.0,
        "tone_opposition": opposed / tone_positions if tone_positions else 0.0,
        "tone_positions": tone_positions,
        "pos_parallel": pos_ok / pos_total if pos_total else 0.0,
        "pos_words": pos_total,
    }


def corpus_bleu(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Character-level corpus BLEU (0-100): characters separated by spaces, tokenize='none'."""
    import sacrebleu

    if not predictions:
        return 0.0
    hyps = [" ".join(p) for p in predictions]
    refs = [" ".join(r) for r in references]
    return float(sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score)


def ideograph_hits(uppers: Sequence[str], references: Sequence[str], predictions: Sequence[str]) -> tuple[int, int]:
    """(correct, scored): positions of the reference whose upper character is an ideograph, and how
    many of them the prediction matches (a position the prediction lacks counts as wrong)."""
    correct = total = 0
    for upper, ref, pred in zip(uppers, references, predictions):
        for i, (up, want) in enumerate(zip(upper, ref)):
            if is_ideograph(up):
                total += 1
                correct += i < len(pred) and pred[i] == want
    return correct, total


def compute_metrics(
    uppers: Sequence[str], references: Sequence[str], predictions: Sequence[str]
) -> dict[str, object]:
    """Accuracy, BLEU and couplet-structure rates (module doc lists every key)."""
    if not (len(uppers) == len(references) == len(predictions)):
        raise ValueError(
            f"need equally many lines: {len(uppers)} upper, {len(references)} reference, {len(predictions)} predicted"
        )
    n = len(uppers)
    correct = total = exact = 0
    for ref, pred in zip(references, predictions):
        total += len(ref)
        correct += sum(a == b for a, b in zip(ref, pred))
        exact += ref == pred
    ideo_correct, ideo_total = ideograph_hits(uppers, references, predictions)
    cache: dict[str, frozenset[int]] = {}
    metrics: dict[str, object] = {
        "n": n,
        "char_accuracy": correct / total if total else 0.0,
        "ideograph_accuracy": ideo_correct / ideo_total if ideo_total else 0.0,
        "ideograph_positions": ideo_total,
        "exact_match": exact / n if n else 0.0,
        "bleu": corpus_bleu(references, predictions),
    }
    metrics.update(structure_metrics(uppers, predictions, seg_cache=cache))
    metrics["references"] = structure_metrics(uppers, references, seg_cache=cache)
    return metrics
