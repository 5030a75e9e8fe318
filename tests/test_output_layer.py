"""model.output=adaptive (issue 20 item 6): torch's adaptive softmax as the labellers' output layer, held to
exact, normalised log-probabilities, a loss that is their mean NLL over non-PAD positions, training, save/load,
distributed-safe gradients, tiny vocabularies, and old folders loading as output=full."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from couplet.core.config import Config, ConfigError, ModelConfig, load_config
from couplet.data.vocab import PAD, Vocab
from couplet.modelling.model import MODEL_KINDS, adaptive_cutoffs, build_labeller, load_labeller, save_labeller

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [("晚风摇树树还挺", "晨露润花花更红"), ("今天天气不错", "明日风光更佳"), ("鱼跃此时海", "花开彼岸天"), ("只有香如故", "何须色更新")]


def adaptive(kind: str = "gated_cnn", **changes) -> ModelConfig:
    settings = dict(kind=kind, embed_dim=16, n_blocks=2, attn_heads=2, refine_blocks=1, output="adaptive", word_features=False)
    return ModelConfig(**(settings | changes))


def batch(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids, targets = torch.randint(1, vocab_size, (3, 6), generator=g), torch.randint(1, vocab_size, (3, 6), generator=g)
    ids[0, 4:], targets[0, 4:] = PAD, PAD  # a shorter line, padded
    return ids, targets


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("vocab_size", [2, 3, 5, 60])
def test_log_probs_are_normalised_and_the_loss_is_their_mean_nll(kind, vocab_size):
    torch.manual_seed(0)
    model = build_labeller(vocab_size, adaptive(kind)).eval()
    assert isinstance(model.head, nn.AdaptiveLogSoftmaxWithLoss)
    ids, targets = batch(vocab_size)
    lp = model.log_probs(ids)  # (B, L, V)
    assert lp.shape == (3, 6, vocab_size)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, 6))
    with torch.no_grad():
        _, loss = model(ids, targets=targets)
    keep = targets != PAD
    nll = -lp.gather(2, targets.unsqueeze(2)).squeeze(2)[keep].mean()
    torch.testing.assert_close(loss, nll, rtol=1e-5, atol=1e-5)


def test_the_loss_equals_torchs_own_adaptive_loss_on_the_non_pad_rows():
    torch.manual_seed(0)
    model = build_labeller(60, adaptive()).eval()
    ids, targets = batch(60)
    with torch.no_grad():
        _, loss = model(ids, targets=targets)
        x = model.features(ids).reshape(-1, 16)
        keep = targets.reshape(-1) != PAD
        torch.testing.assert_close(loss, model.head(x[keep], targets.reshape(-1)[keep]).loss)


def test_every_parameter_gets_a_gradient_even_when_a_cluster_has_no_targets():
    # DistributedDataParallel fails a step where a parameter took no part; a batch of head ids only must not do that
    torch.manual_seed(0)
    model = build_labeller(60, adaptive())
    ids, targets = batch(60)
    targets = targets.clamp(max=model.head.cutoffs[0] - 1)  # head ids (and PAD) only
    _, loss = model(ids, targets=targets)
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert all(float(p.grad.abs().sum()) == 0 for p in model.head.tail.parameters())  # no tail targets: zero


def test_cutoffs_are_shares_of_the_vocabulary_and_tiny_vocabularies_still_work():
    assert adaptive_cutoffs(7021, (0.125, 0.33)) == [878, 2317]
    assert adaptive_cutoffs(5, (0.125, 0.33)) == [1, 2]
    assert adaptive_cutoffs(3, (0.125, 0.33)) == [1]
    assert adaptive_cutoffs(2, (0.125, 0.33)) == [1]
    assert build_labeller(2, adaptive()).head.cutoffs == [1, 2]


def test_untrained_adaptive_layer_starts_near_a_uniform_distribution():
    # each cluster's head entry starts with its share of ids, so the first loss is about log V, as a full layer's
    torch.manual_seed(0)
    model = build_labeller(600, adaptive()).eval()
    ids = torch.randint(2, 600, (8, 7))
    with torch.no_grad():
        _, loss = model(ids, targets=ids)
    assert abs(float(loss) - torch.log(torch.tensor(600.0)).item()) < 0.5


@pytest.mark.parametrize("kind", ["gated_cnn", "attention"])
def test_training_with_the_adaptive_layer_learns_a_handful_of_couplets(kind):
    vocab = Vocab.from_counts({ch: 1 for ch in "".join(u + d for u, d in PAIRS)}, min_count=1)
    torch.manual_seed(0)
    model = build_labeller(len(vocab), adaptive(kind, dropout=0.0, attn_dropout=0.0, embed_dim=32))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    rows: dict[int, list] = {}
    for up, down in PAIRS:
        rows.setdefault(len(up), []).append((vocab.encode(up), vocab.encode(down)))
    batches = [(torch.tensor([u for u, _ in r]), torch.tensor([d for _, d in r])) for r in rows.values()]
    losses = []
    for _ in range(60):
        for up, down in batches:
            _, loss = model(up, down)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]
    for up, down in PAIRS:
        assert vocab.decode(model.log_probs(torch.tensor([vocab.encode(up)]))[0].argmax(-1)) == down


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_save_load_round_trip_answers_identically(tmp_path, kind):
    vocab = Vocab.from_counts({ch: 1 for ch in "".join(u + d for u, d in PAIRS)}, min_count=1)
    config = Config(model=adaptive(kind))
    torch.manual_seed(0)
    model = build_labeller(len(vocab), config.model).eval()
    save_labeller(model, vocab, config, tmp_path / "m")
    loaded, _, config2 = load_labeller(tmp_path / "m")
    assert config2.model.output == "adaptive" and isinstance(loaded.head, nn.AdaptiveLogSoftmaxWithLoss)
    ids = torch.tensor([vocab.encode(PAIRS[0][0]), vocab.encode(PAIRS[1][0]) + [PAD]])
    torch.testing.assert_close(loaded.log_probs(ids), model.log_probs(ids), rtol=0, atol=0)
    assert model.state_dict().keys() == loaded.state_dict().keys()


def test_a_folder_written_before_the_field_loads_as_full(tmp_path):
    vocab = Vocab.from_counts({ch: 1 for ch in "".join(u + d for u, d in PAIRS)}, min_count=1)
    config = Config(model=ModelConfig(kind="gated_cnn", embed_dim=16, n_blocks=2, output="full", word_features=False))  # what it wrote then
    torch.manual_seed(0)
    model = build_labeller(len(vocab), config.model).eval()
    save_labeller(model, vocab, config, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in ("output", "adaptive_cutoffs", "adaptive_div"):
        del raw["model"][key]  # as a version before the field wrote it
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    loaded, _, config2 = load_labeller(tmp_path / "m")
    assert config2.model.output == "full" and isinstance(loaded.head, nn.Linear)
    assert sorted(k for k in loaded.state_dict() if k.startswith("head")) == ["head.bias", "head.weight"]
    ids = torch.tensor([vocab.encode(PAIRS[0][0])])
    torch.testing.assert_close(loaded.log_probs(ids), model.log_probs(ids), rtol=0, atol=0)


def test_output_settings_are_checked_in_one_line():
    config = load_config(None, ["model.output=adaptive", "model.adaptive_cutoffs=[0.1, 0.3, 0.6]", "model.adaptive_div=4"])
    assert config.model.adaptive_cutoffs == (0.1, 0.3, 0.6) and config.model.adaptive_div == 4.0
    for bad in (["model.output=sampled"], ["model.adaptive_cutoffs=[0.3, 0.1]"], ["model.adaptive_cutoffs=[0.5, 1.0]"],
                ["model.adaptive_cutoffs=[]"], ["model.embed_dim=8", "model.attn_heads=2", "model.adaptive_div=4"]):
        with pytest.raises(ConfigError) as err:
            load_config(None, bad)
        assert "\n" not in str(err.value)


def test_the_train_stage_trains_resumes_and_saves_an_adaptive_model(tmp_path):
    from safetensors.torch import load_file

    from couplet.core.config import replace
    from couplet.modelling.loop import TrainingInterrupted
    from couplet.modelling.train import train_labeller
    from shardkit import make_build_dir

    build = make_build_dir(tmp_path, PAIRS, valid_pairs=PAIRS[:2], test_pairs=PAIRS[:2])
    config = replace(Config(), "model", embed_dim=32, n_blocks=2, output="adaptive")
    config = replace(config, "train", batch_size=2, lr=2e-2, num_threads=1, checkpoint_every=5, max_steps=12,
                     eval_every=4, patience=100, warmup_steps=3, ema_decay=0.9)
    full = train_labeller(build, config, tmp_path / "full", progress=False)
    with pytest.raises(TrainingInterrupted):
        train_labeller(build, config, tmp_path / "cut", progress=False, stop_after=7)  # last checkpoint: step 5
    resumed = train_labeller(build, config, tmp_path / "cut", progress=False)
    assert resumed["resumed_from"] == 5 and resumed["steps"] == full["steps"] == 12
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert "head.head.weight" in a and "head.weight" not in a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)
    model, _, loaded = load_labeller(tmp_path / "full")
    assert loaded.model.output == "adaptive" and isinstance(model.head, nn.AdaptiveLogSoftmaxWithLoss)
