"""Evaluate a predictor on (upper, reference) pairs, and the decoding ablation.

- `read_pair_files(in_path, out_path)`: the dataset's format (one half-line per line, characters
  separated by spaces, a trailing space; a BOM and CRLF line ends are tolerated).
- `evaluate_pairs(predictor, uppers, references)`: decode every upper line (batched) and score the
  predictions with `couplet.evaluation.metrics.compute_metrics`.
- `ablation(predictor, uppers, references)`: the same metrics for each decoding variant, from the
  seed's argmax to every couplet constraint (each model call is shared by all variants). Both decode
  through the predictor, as its decoding settings say (couplet.decoding.settings).
- `run_evaluate(trained, built, config, home)`: stage 5. It chooses the phrase-memory fusion weights on the
  valid split (couplet.evaluation.tuning; `decode.json`, and every grid point in `tuning.json`), then scores the
  test split with the trained model into the model folder (`metrics.json` "test", `samples.md`,
  `evaluation.json`), beside the phrase-table baseline of the build's train split (couplet.evaluation.baseline,
  the floor: `metrics.json` "test_baseline", a column of `samples.md`, and `baseline_ideograph_accuracy` /
  `beats_baseline` in the test metrics, what promotion reads) and the per-character dictionary for reference
  ("test_dictionary"), all on the same pairs with the same rules.

Characters missing from the model's vocabulary are fed to the model as UNK here (test sets contain
rare characters); lines that still cannot be answered (empty, too long, Latin letters) get an empty
prediction and are counted in `n_unanswerable`.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from couplet.core.atomic import atomic_write_json, atomic_write_text, read_json
from couplet.data.build import read_split_text
from couplet.core.catalog import MODEL_FILES, PROBE_LINES, Catalog
from couplet.core.config import Config
from couplet.decoding.constraints import ARGMAX, DecodeOptions
from couplet.core.locks import hold_lock
from couplet.evaluation.metrics import compute_metrics
from couplet.predictor import InputError, Predictor
from couplet.registry import fingerprint_pairs
from couplet.core.stage import run_cached, stage_key

# The decoding-ablation rows: each constraint alone on top of the seed's argmax, then combined.
ABLATION_VARIANTS: list[tuple[str, DecodeOptions]] = [
    ("argmax (seed)", ARGMAX),
    ("+no-copy", replace(ARGMAX, no_copy=True)),
    ("+punctuation", replace(ARGMAX, punctuation=True)),
    ("+repetition", replace(ARGMAX, repetition=True)),
    ("+tone", replace(ARGMAX, tone=True)),
    ("+no-reuse", replace(ARGMAX, no_reuse=True)),
    ("constrained, reuse allowed", DecodeOptions(no_copy=True, punctuation=True, repetition=True, tone=False, no_reuse=False)),
    ("constrained (default)", DecodeOptions(no_copy=True, punctuation=True, repetition=True, tone=False, no_reuse=True)),
    ("all (+tone)", DecodeOptions(no_copy=True, punctuation=True, repetition=True, tone=True, no_reuse=True)),
]


def _read_lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    lines = text.split("\n")
    if lines and lines[-1].strip() == "":
        lines.pop()  # the final newline
    return ["".join(line.split()) for line in lines]


def read_pair_files(in_path: str | os.PathLike, out_path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Upper lines from `in_path` and reference lower lines from `out_path`, spaces removed."""
    uppers = _read_lines(Path(in_path))
    references = _read_lines(Path(out_path))
    if len(uppers) != len(references):
        raise ValueError(
            f"{in_path} has {len(uppers)} lines but {out_path} has {len(references)}; they must pair line by line"
        )
    return uppers, references


def _decode_all(
    predictor: Predictor, uppers: Sequence[str], variants: Sequence[DecodeOptions], batch_size: int
) -> tuple[list[list[str]], int]:
    """Best lower line of every upper line under each decoding variant, answered as `predictor.answer` does (one
    model call per batch, shared by the variants)."""
    from couplet.evaluation.tuning import decode_each

    return decode_each(predictor, uppers, [(predictor, options) for options in variants], batch_size)


def evaluate_pairs(
    predictor: Predictor,
    uppers: Sequence[str],
    references: Sequence[str],
    *,
    constrained: bool = True,
    tone: bool = False,
    batch_size: int = 512,
    direction: str = "down",
) -> tuple[dict, list[str]]:
    """(metrics, predictions): decode every upper line and score against the references (no-reuse as the
    predictor's decoding settings say, with `constrained`). direction="up": `uppers` are lower lines and the
    references upper lines (a model trained with the direction marker)."""
    if len(uppers) != len(references):
        raise ValueError(f"{len(uppers)} upper lines but {len(references)} references")
    options = predictor.decode_options(constrained=constrained, tone=tone)
    results = predictor.match_batch(
        uppers, top_k=1, options=options, allow_unknown=True, errors="return", batch_size=batch_size, direction=direction
    )
    predictions = [r.best if not isinstance(r, InputError) else "" for r in results]
    bad = sum(isinstance(r, InputError) for r in results)
    refs = ["".join(r.split()) for r in references]
    ups = ["".join(u.split()) for u in uppers]
    metrics = compute_metrics(ups, refs, predictions)
    metrics["n_unanswerable"] = bad
    metrics["decoding"] = options.names() or ["argmax"]
    metrics["model"] = predictor.model_id
    metrics["direction"] = direction
    return metrics, predictions


def ablation(
    predictor: Predictor,
    uppers: Sequence[str],
    references: Sequence[str],
    *,
    batch_size: int = 512,
    variants: Sequence[tuple[str, DecodeOptions]] = tuple(ABLATION_VARIANTS),
) -> list[dict]:
    """One metrics row per decoding variant (`decoding`: its name, `constraints`: what it enforces)."""
    if len(uppers) != len(references):
        raise ValueError(f"{len(uppers)} upper lines but {len(references)} references")
    all_predictions, bad = _decode_all(predictor, uppers, [options for _, options in variants], batch_size)
    refs = ["".join(r.split()) for r in references]
    ups = ["".join(u.split()) for u in uppers]
    rows = []
    for (name, options), predictions in zip(variants, all_predictions):
        metrics = compute_metrics(ups, refs, predictions)
        rows.append({"decoding": name, "constraints": options.names(), "n_unanswerable": bad, **metrics})
    return rows


ABLATION_COLUMNS = [
    ("bleu", "BLEU", "{:.2f}"),
    ("ideograph_accuracy", "ideograph acc", "{:.3f}"),
    ("char_accuracy", "char acc", "{:.3f}"),
    ("exact_match", "exact", "{:.3f}"),
    ("copy_rate", "copy", "{:.3f}"),
    ("reuse_rate", "reuse", "{:.3f}"),  # 不重字: lines reusing an upper ideograph anywhere
    ("punct_match", "punct", "{:.3f}"),
    ("repetition_match", "repetition", "{:.3f}"),
    ("tone_rate", "tone", "{:.3f}"),
    ("tone_opposition", "tone opposition", "{:.3f}"),
    ("pos_parallel", "POS parallel", "{:.3f}"),
    ("boundary_f1", "boundary F1", "{:.3f}"),
]


def ablation_markdown(rows: list[dict]) -> str:
    """The ablation rows as a Markdown table (plus a references row for the structure columns)."""
    head = "| decoding | " + " | ".join(label for _, label, _ in ABLATION_COLUMNS) + " |"
    sep = "| --- | " + " | ".join("---:" for _ in ABLATION_COLUMNS) + " |"
    lines = [head, sep]
    for row in rows:
        cells = [fmt.format(row[key]) for key, _, fmt in ABLATION_COLUMNS]
        lines.append(f"| {row['decoding']} | " + " | ".join(cells) + " |")
    if rows:
        ref = rows[0]["references"]
        cells = [fmt.format(ref[key]) if key in ref else "" for key, _, fmt in ABLATION_COLUMNS]
        lines.append("| *references* | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- stage 5


def samples_markdown(
    predictor, uppers: list[str], references: list[str], predictions: list[str], config: Config,
    baseline=None, baseline_predictions: list[str] | None = None, preamble: str = "",
) -> tuple[str, list[dict]]:
    """The probe lines plus `n_samples` random test couplets with reference and output (and the
    baseline's output, when `baseline` and its test predictions are given), after
    `preamble` (Markdown, e.g. the scores)."""
    def probe(answerer) -> list[str]:
        results = answerer.match_batch(list(PROBE_LINES), constrained=config.decode.constrained, tone=config.decode.tone,
                                       allow_unknown=True, errors="return")
        return [getattr(result, "best", f"({result})") for result in results]

    with_baseline = baseline is not None and baseline_predictions is not None
    rows = [{"kind": "probe", "upper": line, "reference": "", "output": out} for line, out in zip(PROBE_LINES, probe(predictor))]
    rng = random.Random(config.train.seed)
    tests = sorted(rng.sample(range(len(uppers)), min(config.evaluate.n_samples, len(uppers))))
    rows += [{"kind": "test", "upper": uppers[i], "reference": references[i], "output": predictions[i]} for i in tests]
    if with_baseline:
        for row, out in zip(rows, probe(baseline) + [baseline_predictions[i] for i in tests]):
            row["baseline"] = out
    columns = ["kind", "upper", "reference", "output"] + (["baseline"] if with_baseline else [])
    head = ["", "upper (上联)", "reference (下联)", "model"] + ([BASELINE_NAME] if with_baseline else [])
    lines = ["## Evaluation samples", "", *([preamble, ""] if preamble else [])]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n", rows


SCORE_COLUMNS = [("ideograph_accuracy", "ideograph acc", "{:.3f}"), ("char_accuracy", "char acc", "{:.3f}"),
                 ("exact_match", "exact", "{:.3f}"), ("bleu", "BLEU", "{:.2f}"),
                 # what couplet writers judge by (couplet/evaluation/metrics.py)
                 ("reuse_rate", "reuse", "{:.3f}"), ("tone_rate", "final tone", "{:.3f}"),
                 ("tone_opposition", "tone opposition", "{:.3f}"), ("pos_parallel", "POS parallel", "{:.3f}"),
                 ("repetition_match", "repetition", "{:.3f}")]


def scores_markdown(scores: dict[str, dict]) -> str:
    """The headline test metrics of each row ({name: metrics}) as a Markdown table."""
    lines = ["| test split | " + " | ".join(label for _, label, _ in SCORE_COLUMNS) + " |",
             "| --- |" + " ---: |" * len(SCORE_COLUMNS)]
    for name, metrics in scores.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(metrics[key]) if key in metrics else "" for key, _, fmt in SCORE_COLUMNS) + " |")
    return "\n".join(lines)


BASELINE_NAME = "phrase-table baseline"  # the floor: couplet.evaluation.baseline.PhraseBaseline


def beats_baseline(metrics: dict, baseline_metrics: dict) -> bool:
    """Whether a model's ideograph accuracy is above the baseline's (on the same pairs)."""
    return metrics["ideograph_accuracy"] > baseline_metrics["ideograph_accuracy"] + 1e-9


def evaluate_key(train_key: str, config: Config) -> str:
    """The evaluate stage's cache key: the train key and the decode and evaluate config sections."""
    return stage_key("evaluate", train_key, config.section_hash("decode", "evaluate"))


def _tuned_decode(folder: Path, build_dir: Path, config: Config) -> tuple[Config, dict]:
    """The decode section evaluate scores (and the folder answers with from now on): config's, with the phrase weights
    chosen on the valid split when `evaluate.tune_decode`; and what the choice saw (rows, the baseline's weights)."""
    from couplet.data.vocab import Vocab
    from couplet.decoding.phrases import PhraseMemory
    from couplet.evaluation.baseline import PHRASE_BASELINE_WEIGHTS, PhraseBaseline
    from couplet.evaluation.tuning import BASELINE_GRID, PHRASE_GRID, choose_decode, sample_rows

    if not (folder / MODEL_FILES.phrases).is_file():  # a folder trained before the memory existed: count it now
        vocab_size = len(Vocab.load(folder / MODEL_FILES.vocab))
        PhraseMemory.count_build(build_dir, vocab_size).save(folder / MODEL_FILES.phrases)
    tuning: dict = {"tuned": False, "baseline_weights": list(PHRASE_BASELINE_WEIGHTS)}
    if not config.evaluate.tune_decode:
        return config, tuning
    uppers, references = sample_rows(*read_split_text(build_dir, "valid"), config.evaluate.tune_rows, config.train.seed)
    if not uppers:
        return config, tuning
    atomic_write_json(folder / MODEL_FILES.decode, config.decode.model_dump())  # not an earlier evaluation's choice
    predictor = Predictor.load(folder)
    memory = PhraseMemory.load(folder / MODEL_FILES.phrases, vocab_size=len(predictor.vocab))
    predictor.decoding = replace(predictor.decoding, phrases=memory)  # every grid point uses it, whatever config says
    chosen, rows = choose_decode(predictor, uppers, references, PHRASE_GRID)
    base = PhraseBaseline(memory, predictor.vocab, predictor.config)
    base_chosen, base_rows = choose_decode(base, uppers, references, BASELINE_GRID)
    tuning = {"tuned": True, "n_valid": len(uppers), "grid": rows, "baseline_grid": base_rows,
              "baseline_weights": [base_chosen.phrase_bi, base_chosen.phrase_tri],
              "chosen": {key: getattr(chosen, key) for key in ("phrase_uni", "phrase_bi", "phrase_tri")}}
    return config.model_copy(update={"decode": chosen}), tuning


def run_evaluate(trained: dict, built: dict, config: Config, home: Path, force: bool = False) -> dict:
    """Stage 5: choose the fusion weights on valid, decode the test split with the trained model and score it beside
    the phrase-table baseline (the floor) and the dictionary (for reference)."""
    key = evaluate_key(trained["key"], config)
    catalog = Catalog(home)
    model_dir = catalog.resolve(trained["model"])  # manifests name paths relative to the home
    build_dir = catalog.resolve(built["build_dir"])

    def produce(folder: Path) -> dict:
        from couplet.evaluation.baseline import DictionaryBaseline, PhraseBaseline  # torch: not for key look-ups

        uppers, references = read_split_text(build_dir, "test")
        fingerprint = fingerprint_pairs(uppers, references, config.evaluate.max_eval)  # of the whole split
        if config.evaluate.max_eval is not None:
            uppers, references = uppers[: config.evaluate.max_eval], references[: config.evaluate.max_eval]
        scored_config, tuning = _tuned_decode(folder, build_dir, config)
        # the decoding settings this evaluation scores are the folder's from now on (match/serve answer with them)
        atomic_write_json(folder / MODEL_FILES.decode, scored_config.decode.model_dump())
        atomic_write_json(folder / MODEL_FILES.tuning, tuning)
        predictor = Predictor.load(folder)
        decoding = {"constrained": config.decode.constrained, "tone": config.decode.tone}
        metrics, predictions = evaluate_pairs(predictor, uppers, references, **decoding)
        from couplet.decoding.phrases import PhraseMemory

        memory = predictor.decoding.phrases or PhraseMemory.load(folder / MODEL_FILES.phrases, len(predictor.vocab))
        baseline = PhraseBaseline(memory, predictor.vocab, predictor.config, weights=tuple(tuning["baseline_weights"]))
        baseline_metrics, baseline_predictions = evaluate_pairs(baseline, uppers, references, **decoding)
        dictionary = DictionaryBaseline.from_build(build_dir, predictor.config)  # same max_len: same lines answered
        dictionary_metrics, _ = evaluate_pairs(dictionary, uppers, references, **decoding)
        reverse = None
        if getattr(getattr(predictor.model, "cfg", None), "directions", 1) == 2:  # the same test pairs, lower -> upper
            reverse, _ = evaluate_pairs(predictor, references, uppers, direction="up", **decoding)
            metrics["reverse_ideograph_accuracy"], metrics["reverse_bleu"] = reverse["ideograph_accuracy"], reverse["bleu"]
        for scored in (metrics, baseline_metrics, dictionary_metrics, *([reverse] if reverse else [])):
            scored["test_fingerprint"] = fingerprint
            scored["n_test"] = len(uppers)
        metrics["baseline"] = BASELINE_NAME
        metrics["baseline_ideograph_accuracy"] = baseline_metrics["ideograph_accuracy"]
        metrics["beats_baseline"] = beats_baseline(metrics, baseline_metrics)
        metrics["dictionary_ideograph_accuracy"] = dictionary_metrics["ideograph_accuracy"]
        preamble = scores_markdown({f"model ({len(uppers)} couplets)": metrics, BASELINE_NAME: baseline_metrics,
                                    "dictionary (reference)": dictionary_metrics,
                                    **({"model, reverse (lower → upper)": reverse} if reverse else {})})
        if tuning["tuned"]:
            chosen = tuning["chosen"]
            preamble += (f"\n\nFusion weights chosen on {tuning['n_valid']} valid couplets: phrase unigrams "
                         f"{chosen['phrase_uni']:g}, bigrams {chosen['phrase_bi']:g}, trigrams {chosen['phrase_tri']:g} "
                         f"(the baseline: bigrams {tuning['baseline_weights'][0]:g}, trigrams {tuning['baseline_weights'][1]:g}).")
        if not metrics["beats_baseline"]:
            preamble += f"\n\nThe model does **not** beat the {BASELINE_NAME} on ideograph accuracy."
        samples_md, sample_rows = samples_markdown(predictor, uppers, references, predictions, config,
                                                   baseline, baseline_predictions, preamble)

        all_metrics = read_json(folder / MODEL_FILES.metrics)
        all_metrics["test"] = metrics
        all_metrics["test_baseline"] = baseline_metrics
        all_metrics["test_dictionary"] = dictionary_metrics
        if reverse:
            all_metrics["test_reverse"] = reverse
        atomic_write_json(folder / MODEL_FILES.metrics, all_metrics)
        samples_path = folder / MODEL_FILES.samples
        previous = samples_path.read_text(encoding="utf-8") if samples_path.is_file() else ""
        previous = previous.split("## Evaluation samples")[0].rstrip()  # training's probe outputs stay
        atomic_write_text(samples_path, (previous + "\n\n" if previous else "") + samples_md)
        return {"model": catalog.relative(model_dir), "run_id": trained["run_id"], "metrics": metrics, "samples": sample_rows,
                "baseline_metrics": baseline_metrics, "dictionary_metrics": dictionary_metrics,
                "beats_baseline": metrics["beats_baseline"]}

    with hold_lock(home, f"models/{trained['run_id']}"):  # metrics.json and samples.md are rewritten
        result = run_cached("evaluate", key, model_dir, produce, force=force, manifest_name=MODEL_FILES.evaluate_manifest,
                            outputs=(MODEL_FILES.metrics, MODEL_FILES.samples, MODEL_FILES.decode), in_place=True)
    return catalog.resolved(result, ("model",))  # the caller gets the folder under the current home
