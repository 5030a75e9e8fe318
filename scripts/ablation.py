#!/usr/bin/env python
"""The decoding ablation: metrics of one trained model under each decoding variant.

    .venv/bin/python scripts/ablation.py --model models/<run-id> \
        --in data/raw/couplet/<sha>/extracted/couplet/test/in.txt \
        --out data/raw/couplet/<sha>/extracted/couplet/test/out.txt [--limit N] [--json FILE] [--update-doc]

Prints a Markdown table (argmax as in the seed, each constraint alone, the default constrained
decoding, everything with the tone rule) plus the references' structure rates. `--update-doc`
replaces the table between the ablation markers in docs/decoding.md; `--json FILE` saves all rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

START, END = "<!-- ablation:start -->", "<!-- ablation:end -->"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model dir (default: champion / latest under $COUPLET_HOME/models)")
    ap.add_argument("--in", dest="in_path", required=True, help="upper lines (dataset format)")
    ap.add_argument("--out", dest="out_path", required=True, help="reference lower lines")
    ap.add_argument("--limit", type=int, help="first N pairs only")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--json", dest="json_path", help="write the rows as JSON here")
    ap.add_argument("--update-doc", action="store_true", help="write the table into docs/decoding.md")
    args = ap.parse_args()

    import torch

    from couplet.core.atomic import atomic_write_json, atomic_write_text
    from couplet.evaluation.evaluate import ablation, ablation_markdown, read_pair_files
    from couplet.predictor import InputError, ModelNotFoundError, Predictor, resolve_model_dir

    try:
        model_dir = resolve_model_dir(args.model)
        uppers, references = read_pair_files(args.in_path, args.out_path)
    except (ModelNotFoundError, InputError, OSError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.limit:
        uppers, references = uppers[: args.limit], references[: args.limit]
    predictor = Predictor.load(model_dir, num_threads=min(4, torch.get_num_threads()))
    t0 = time.perf_counter()
    rows = ablation(predictor, uppers, references, batch_size=args.batch_size)
    elapsed = time.perf_counter() - t0
    table = ablation_markdown(rows)
    caption = (
        f"Model `{model_dir.name}`, {len(uppers)} pairs from `{args.in_path}` "
        f"({rows[0]['n_unanswerable']} unanswerable), {time.strftime('%Y-%m-%d')}; "
        f"`scripts/ablation.py` took {elapsed:.0f} s."
    )
    print(table)
    print(caption)
    if args.json_path:
        atomic_write_json(Path(args.json_path), {"model": str(model_dir), "n": len(uppers), "rows": rows})
    if args.update_doc:
        doc = ROOT / "docs" / "decoding.md"
        text = doc.read_text(encoding="utf-8")
        if START not in text or END not in text:
            print(f"error: {doc} has no {START} ... {END} markers", file=sys.stderr)
            return 2
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        atomic_write_text(doc, f"{head}{START}\n{table}\n{caption}\n{END}{tail}")
        print(f"updated {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
