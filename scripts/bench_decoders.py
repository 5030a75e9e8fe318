#!/usr/bin/env python
"""Trained models and the baselines under each decoder, chosen on valid, scored on test and on the outside set.

    .venv/bin/python scripts/bench_decoders.py --build-dir HOME/data/processed/build/<key> \
        default=HOME/models/<run-id> swapped=HOME2/models/<run-id> [--test-rows 0] [--out rows.json]

Rows (issue 20's levers that need no training):
- the per-character dictionary and the phrase-table baseline (its bigram/trigram weights chosen on valid);
- per model: the project's decoder with upper-line characters allowed again (no_reuse off), the default rules
  (no_reuse on), and the default rules with the phrase memory fused in at the weights chosen on valid
  (couplet.evaluation.tuning, the same choice `couplet run`'s evaluate makes).
The phrase memory is the model folder's phrases.parquet, or counted from `--build-dir`'s train split when the folder
predates it. Columns: the reference metrics (ideograph accuracy, BLEU) on test and on the outside set
(scripts/outside), and the writers' measures on test (reuse, final tone, tone opposition, POS parallelism,
repetition, same-position copies). Prints Markdown; `--out` writes every row (and the valid grids) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = [("ideograph_accuracy", "ideograph acc", "{:.3f}"), ("bleu", "BLEU", "{:.2f}"),
           ("reuse_rate", "reuse", "{:.3f}"), ("tone_rate", "final tone", "{:.3f}"),
           ("tone_opposition", "tone opp", "{:.3f}"), ("pos_parallel", "POS parallel", "{:.3f}"),
           ("repetition_match", "repetition", "{:.3f}"), ("copy_rate", "copy", "{:.3f}")]


def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")
    feats = "AVX-512" if "avx512f" in text else "AVX2" if "avx2" in text else "no AVX2"
    return f"{name}, {os.cpu_count()} cores, {feats}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", type=Path, required=True)
    parser.add_argument("--valid-rows", type=int, default=2000, help="valid couplets the weights are chosen on")
    parser.add_argument("--test-rows", type=int, default=0, help="test couplets scored (0: all)")
    parser.add_argument("--outside", type=Path, default=ROOT / "scripts" / "outside", help="folder with in.txt, out.txt")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-baselines", action="store_true", help="score the models only (the baselines depend on the build alone)")
    parser.add_argument("models", nargs="*", help="name=model-folder")
    args = parser.parse_args(argv)

    import torch

    from couplet.core.catalog import MODEL_FILES
    from couplet.data.build import read_build_vocab, read_split_text
    from couplet.decoding.phrases import PhraseMemory
    from couplet.decoding.settings import DecodeSettings
    from couplet.evaluation.baseline import DictionaryBaseline, PhraseBaseline
    from couplet.evaluation.evaluate import evaluate_pairs, read_pair_files
    from couplet.evaluation.tuning import BASELINE_GRID, PHRASE_GRID, choose_decode, sample_rows, with_decode, with_weights
    from couplet.predictor import Predictor

    torch.set_num_threads(1)
    started = time.time()
    vocab = read_build_vocab(args.build_dir)
    valid = sample_rows(*read_split_text(args.build_dir, "valid"), args.valid_rows, 0)
    test = read_split_text(args.build_dir, "test")
    if args.test_rows:
        test = sample_rows(*test, args.test_rows, 0)
    outside = read_pair_files(args.outside / "in.txt", args.outside / "out.txt")
    built_memory = None

    def memory_for(folder: Path | None) -> PhraseMemory:
        nonlocal built_memory
        if folder is not None and (folder / MODEL_FILES.phrases).is_file():
            return PhraseMemory.load(folder / MODEL_FILES.phrases, vocab_size=len(vocab))
        if built_memory is None:
            built_memory = PhraseMemory.count_build(args.build_dir, len(vocab))
        return built_memory

    rows: list[dict] = []

    def score(name: str, answerer, extra: dict | None = None) -> None:
        metrics, _ = evaluate_pairs(answerer, *test)
        out, _ = evaluate_pairs(answerer, *outside)
        rows.append({"answerer": name, "test": {k: metrics[k] for k, _, _ in COLUMNS},
                     "outside": {"ideograph_accuracy": out["ideograph_accuracy"], "bleu": out["bleu"]}, **(extra or {})})
        print(f"{name}: done ({(time.time() - started) / 60:.1f} min)", flush=True)

    if not args.no_baselines:
        score("dictionary", DictionaryBaseline.from_build(args.build_dir))
        base = PhraseBaseline(memory_for(None), vocab)
        base_chosen, base_grid = choose_decode(base, *valid, BASELINE_GRID)
        chosen = (base_chosen.phrase_bi, base_chosen.phrase_tri)
        score(f"phrase table (bi {chosen[0]:g}, tri {chosen[1]:g})",
              PhraseBaseline(memory_for(None), vocab, weights=chosen), {"valid_grid": base_grid})

    for name, folder in (m.split("=", 1) for m in args.models):
        folder = Path(folder)
        predictor = Predictor.load(folder, num_threads=1)
        predictor.decoding = DecodeSettings(predictor.decoding.config)  # no LM; the memory only where asked below
        off = {"lm_weight": 0.0, "phrase_uni": 0.0, "phrase_bi": 0.0, "phrase_tri": 0.0}
        score(f"{name}, reuse allowed", with_decode(predictor, no_reuse=False, **off))
        score(f"{name}", with_decode(predictor, no_reuse=True, **off))
        fused = with_decode(predictor, memory_for(folder), no_reuse=True, lm_weight=0.0)
        decode_config, grid = choose_decode(fused, *valid, PHRASE_GRID)
        weights = (decode_config.phrase_uni, decode_config.phrase_bi, decode_config.phrase_tri)
        score(f"{name} + phrases ({weights[0]:g}/{weights[1]:g}/{weights[2]:g})", with_weights(fused, weights),
              {"valid_grid": grid})

    print(f"\n{cpu_name()}; valid {len(valid[0])} couplets (choice), test {len(test[0])}, outside {len(outside[0])}\n")
    head = ["answerer", *(f"test {title}" for _, title, _ in COLUMNS), "outside acc", "outside BLEU"]
    print("| " + " | ".join(head) + " |\n| --- |" + " ---: |" * (len(head) - 1))
    for row in rows:
        cells = [fmt.format(row["test"][key]) for key, _, fmt in COLUMNS]
        cells += [f"{row['outside']['ideograph_accuracy']:.3f}", f"{row['outside']['bleu']:.2f}"]
        print(f"| {row['answerer']} | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
