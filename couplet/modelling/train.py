"""Stage 4, train: the labeller trained on a build directory into models/<run-id>/, and the choice of how.

`train_labeller` picks how a run trains from train.nproc: with 1, in this process
(couplet.modelling.loop.train_in_process: the loop, resumable); with more, under torchrun
(couplet.modelling.distributed.launch_training, whose ranks each run that same loop). With nproc 1 no
process group is started and couplet.modelling.distributed is never loaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from couplet.core.catalog import MODEL_FILES, Catalog
from couplet.core.config import Config
from couplet.core.locks import hold_lock
from couplet.core.stage import run_cached, stage_key
from couplet.data.vocab import Vocab


def train_labeller(build_dir: Path, config: Config, model_dir: Path, *, progress: bool = True,
                   stop_after: int | None = None) -> dict:
    """Train on `build_dir`'s train split (valid for early stopping) and write `model_dir`.

    Returns a summary: model_dir, steps, epochs, best_valid_loss, tokens_per_s, seconds, device, resumed_from.
    `stop_after` (tests only, one process) raises loop.TrainingInterrupted after that step, as a kill would.
    """
    if config.train.nproc == 1:
        from couplet.modelling.loop import train_in_process  # torch: loaded by runs that train, not by key look-ups

        return train_in_process(build_dir, config, model_dir, progress=progress, stop_after=stop_after)
    if stop_after is not None:
        raise ValueError("stop_after is for single-process runs (train.nproc=1)")
    from couplet.modelling.distributed import launch_training

    return launch_training(Path(build_dir), config, Path(model_dir), progress=progress)


def fit_lower_line_lm(build_dir: Path, model_dir: Path) -> None:
    """The lower-line bigram LM of the build's train split, for decode.lm_weight: model_dir/lm.npz (a few seconds)."""
    from couplet.data.build import read_split_text
    from couplet.decoding.lm import CharBigramLM

    vocab = Vocab.load(model_dir / MODEL_FILES.vocab)
    CharBigramLM.fit(read_split_text(build_dir, "train")[1], vocab).save(model_dir / MODEL_FILES.lm)


def fit_phrase_memory(build_dir: Path, model_dir: Path) -> dict:
    """The aligned phrase memory of the build's train split, for decode.phrase_*: model_dir/phrases.parquet.
    Returns its sizes (entries per order, MB in memory)."""
    from couplet.decoding.phrases import PhraseMemory

    memory = PhraseMemory.count_build(build_dir, len(Vocab.load(model_dir / MODEL_FILES.vocab)))
    memory.save(model_dir / MODEL_FILES.phrases)
    return memory.describe()


def train_key(build_key: str, config: Config) -> str:
    """The train stage's cache key: the build's key and the model and train config sections."""
    return stage_key("train", build_key, config.section_hash("model", "train"))


def train_run_id(dataset_version: str, key: str) -> str:
    """The model folder's name, models/<run-id>/: a killed run resumes in the same folder."""
    return f"{dataset_version}-{key[:8]}"


def run_train(built: dict, config: Config, home: Path, force: bool = False, progress: bool = True) -> dict:
    """Stage 4: train the labeller on the build's shards into models/<run-id>/ (resumes a killed run)."""
    key = train_key(built["key"], config)
    run_id = train_run_id(built["dataset_version"], key)
    model_dir = Catalog(home).model_dir(run_id)

    def produce(folder: Path) -> dict:
        summary = train_labeller(Path(built["build_dir"]), config, folder, progress=progress)
        fit_lower_line_lm(Path(built["build_dir"]), folder)
        fit_phrase_memory(Path(built["build_dir"]), folder)
        return {
            "run_id": run_id,
            "model": Catalog(home).relative(model_dir),  # relative to the home, like every record under it
            "build_key": built["key"],
            "dataset_version": built["dataset_version"],
            "training": {k: v for k, v in summary.items() if k != "model_dir"},
        }

    with hold_lock(home, f"models/{run_id}"):
        if force:
            shutil.rmtree(model_dir / MODEL_FILES.checkpoints, ignore_errors=True)
        trained = run_cached("train", key, model_dir, produce, force=force, manifest_name=MODEL_FILES.train_manifest,
                             outputs=(*MODEL_FILES.required, MODEL_FILES.lm, MODEL_FILES.phrases), in_place=True)
    return Catalog(home).resolved(trained, ("model",))  # under the current home, as the other run_<stage> hand back
