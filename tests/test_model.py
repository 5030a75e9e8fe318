"""The gated-CNN labeller: shapes, PAD masking, the gated block's formula, the loss, save/load.
(The speed kernels' equivalence tests are in test_kernels.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from couplet.core.config import Config, ModelConfig
from couplet.modelling.model import CoupletLabeller, GatedConvBlock, load_labeller, save_labeller
from couplet.data.vocab import PAD, UNK, Vocab

SMALL = ModelConfig(kind="gated_cnn", embed_dim=32, n_blocks=2, word_features=False)
PAIRS = [("晚风摇树树还挺", "晨露润花花更红"), ("今天天气不错", "明日风光更佳"), ("鱼跃此时海", "花开彼岸天"), ("只有香如故", "何须色更新")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(vocab_size: int = 50, seed: int = 0, **changes) -> CoupletLabeller:
    torch.manual_seed(seed)
    return CoupletLabeller(vocab_size, SMALL.model_copy(update=changes))


def test_shapes_and_loss():
    model = tiny_model()
    ids = torch.randint(2, 50, (3, 7))
    logits, loss = model(ids)
    assert logits.shape == (3, 7, 50) and loss is None
    logits2, loss = model(ids, targets=torch.randint(2, 50, (3, 7)))
    assert logits2 is None and loss.shape == () and loss.item() > 0
    assert model.log_probs(ids).shape == (3, 7, 50)


def test_default_config_is_the_seed():
    model = CoupletLabeller(100, ModelConfig(word_features=False))
    assert model.embedding.embedding_dim == 128 and len(model.blocks) == 6 and model.dropout.p == 0.25
    assert model.blocks[0].conv.weight.shape == (256, 128, 3)


def test_gated_block_matches_formula_on_hand_made_input():
    block = GatedConvBlock(dim=2, kernel_size=3)
    with torch.no_grad():
        block.conv.weight.copy_(torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3) / 10 - 1)
        block.conv.bias.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]))
    x = torch.tensor([[[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]])  # (B=1, d=2, L=3)
    # conv by hand: 'same' padding = one zero on each side, out[o, t] = b[o] + sum_i,k w[o, i, k] * x[i, t + k - 1]
    w, b = block.conv.weight.detach(), block.conv.bias.detach()
    xp = F.pad(x, (1, 1))[0]
    h = torch.tensor([[b[o] + sum(w[o, i, k] * xp[i, t + k] for i in range(2) for k in range(3)) for t in range(3)] for o in range(4)])
    g, c = h[:2], h[2:]  # first half gates, second half candidates
    expected = x[0] * torch.sigmoid(g) + c * torch.sigmoid(-g)
    torch.testing.assert_close(block(x)[0], expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the small-inference path (convolution as a matmul) gives the same
        torch.testing.assert_close(block(x)[0], expected, rtol=1e-5, atol=1e-6)


def test_pad_positions_do_not_influence_other_positions():
    model = tiny_model().eval()
    with torch.no_grad():
        model.embedding.weight[PAD] = 100.0  # a PAD embedding that would leak if not masked
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    padded = torch.tensor([[5, 6, 7, 8, 9, PAD, PAD]])
    inner = torch.tensor([[PAD, 5, 6, 7, 8, 9, PAD]])
    with torch.no_grad():
        ref = model(ids)[0]
        torch.testing.assert_close(model(padded)[0][:, :5], ref)
        torch.testing.assert_close(model(inner)[0][:, 1:6], ref)
    # a PAD in the middle splits the line: each side sees only itself
    split = torch.tensor([[5, 6, PAD, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(split)[0][:, :2], model(torch.tensor([[5, 6]]))[0])
        torch.testing.assert_close(model(split)[0][:, 3:], model(torch.tensor([[8, 9]]))[0])


def test_loss_ignores_pad_targets():
    model = tiny_model().eval()
    ids = torch.tensor([[5, 6, 7, PAD, PAD], [8, 9, 10, 11, 12]])
    targets = torch.tensor([[13, 14, 15, PAD, PAD], [16, 17, 18, 19, 20]])
    with torch.no_grad():
        _, loss = model(ids, targets)
        logp = model.log_probs(ids)
    keep = targets != PAD
    expected = -logp.gather(2, targets.unsqueeze(2)).squeeze(2)[keep].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_log_probs_is_eval_mode_and_normalised():
    model = tiny_model().train()
    ids = torch.randint(2, 50, (2, 6))
    a, b = model.log_probs(ids), model.log_probs(ids)
    torch.testing.assert_close(a, b)  # no dropout
    assert model.training and not a.requires_grad
    torch.testing.assert_close(a.exp().sum(-1), torch.ones(2, 6))


def test_tiny_model_overfits_a_handful_of_couplets():
    vocab = Vocab.from_counts({ch: 1 for ch in "".join(u + d for u, d in PAIRS)}, min_count=1)
    model = tiny_model(len(vocab), dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    batches = {}
    for up, down in PAIRS:
        batches.setdefault(len(up), []).append((vocab.encode(up), vocab.encode(down)))
    batches = [(torch.tensor([u for u, _ in rows]), torch.tensor([d for _, d in rows])) for rows in batches.values()]
    for _ in range(60):
        for up, down in batches:
            _, loss = model(up, down)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for up, down in PAIRS:
        pred = model.log_probs(torch.tensor([vocab.encode(up)]))[0].argmax(-1)
        assert vocab.decode(pred) == down


def test_save_load_round_trip(tmp_path):
    vocab = Vocab.from_counts({ch: 1 for ch in "".join(u + d for u, d in PAIRS)}, min_count=1)
    config = Config(model=SMALL)
    model = tiny_model(len(vocab))
    save_labeller(model, vocab, config, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["vocab_size"] == len(vocab) and raw["model"]["embed_dim"] == 32
    loaded, vocab2, config2 = load_labeller(tmp_path / "m")
    assert config2 == config and vocab2.itos == vocab.itos and not loaded.training
    ids = torch.tensor([vocab.encode(PAIRS[0][0]), vocab.encode(PAIRS[1][0]) + [PAD]])
    torch.testing.assert_close(loaded.log_probs(ids), model.log_probs(ids), rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_a_model_folder_from_an_older_version_loads(tmp_path):
    vocab = Vocab.from_counts({ch: 1 for ch in "".join(u + d for u, d in PAIRS)}, min_count=1)
    save_labeller(tiny_model(len(vocab)), vocab, Config(model=SMALL), tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["decode"]["top_k"] = 1  # written by a version whose DecodeConfig still had top_k
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    _, _, config = load_labeller(tmp_path / "m")
    assert config.model == SMALL and config.decode == Config().decode


def test_log_probs_does_not_mask_pad_or_unk():
    model = tiny_model()
    logp = model.log_probs(torch.tensor([[5, 6, 7]]))
    assert torch.isfinite(logp[..., PAD]).all() and torch.isfinite(logp[..., UNK]).all()


def test_cpu_bf16_autocast_trains_with_fp32_weights():
    model = tiny_model()
    ids, targets = torch.randint(2, 50, (4, 6)), torch.randint(2, 50, (4, 6))
    _, ref = model(ids, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(ids, targets)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05 * ref.item()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_failed_save_keeps_the_old_weights_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    vocab = Vocab.from_counts({ch: 1 for ch in "".join(u + d for u, d in PAIRS)}, min_count=1)
    config = Config(model=SMALL)
    save_labeller(tiny_model(len(vocab)), vocab, config, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def half_write(state, filename):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_labeller(tiny_model(len(vocab), seed=1), vocab, config, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


def test_damaged_weights_are_a_one_line_error_naming_the_file(tmp_path):
    vocab = Vocab.from_counts({ch: 1 for ch in "".join(u + d for u, d in PAIRS)}, min_count=1)
    save_labeller(tiny_model(len(vocab)), vocab, Config(model=SMALL), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # cut short, as by a full disk or an interrupted copy
    with pytest.raises(ValueError) as info:
        load_labeller(tmp_path / "m")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{weights} is damaged (") and "couplet run --force train" in message


# --------------------------------------------------------------------------- model kinds


def test_refine_kind_labels_every_position_and_its_eval_loss_is_the_final_pass():
    from couplet.modelling.model import RefiningLabeller, build_labeller

    torch.manual_seed(0)
    model = build_labeller(50, SMALL.model_copy(update={"kind": "refine", "refine_blocks": 2, "output": "full"}))
    assert isinstance(model, RefiningLabeller) and len(model.refine_blocks) == 2
    ids, targets = torch.randint(2, 50, (3, 7)), torch.randint(2, 50, (3, 7))
    assert model(ids)[0].shape == (3, 7, 50) and model.log_probs(ids).shape == (3, 7, 50)
    model.eval()
    with torch.no_grad():
        _, final = model(ids, targets)
        logp = model.log_probs(ids)
    expected = -logp.gather(2, targets.unsqueeze(2)).squeeze(2).mean()
    torch.testing.assert_close(final, expected, rtol=1e-5, atol=1e-6)
    model.train()
    _, both = model(ids, targets)  # training adds the draft's loss
    both.backward()
    assert both.item() > final.item() and model.embedding.weight.grad is not None
    assert model.draft_embedding.weight.grad is not None and model.refine_head.weight.grad is not None


def test_refine_pad_positions_do_not_leak():
    from couplet.modelling.model import build_labeller

    torch.manual_seed(0)
    model = build_labeller(50, SMALL.model_copy(update={"kind": "refine"})).eval()
    with torch.no_grad():
        model.embedding.weight[PAD] = 100.0
        model.draft_embedding.weight[PAD] = 100.0
        torch.testing.assert_close(model(torch.tensor([[5, 6, 7, PAD]]))[0][:, :3], model(torch.tensor([[5, 6, 7]]))[0])


def test_attention_kind_sees_the_whole_line_and_pad_does_not_leak():
    from couplet.modelling.model import AttentionLabeller, build_labeller

    torch.manual_seed(0)
    model = build_labeller(50, SMALL.model_copy(update={"kind": "attention", "attn_layers": 2})).eval()
    assert isinstance(model, AttentionLabeller) and len(model.attention) == 2
    ids = torch.randint(2, 50, (1, 12))
    far = ids.clone()
    far[0, 11] = 2 if ids[0, 11] != 2 else 3  # beyond the gated blocks' receptive field of position 0 (2 blocks: 2 each side)
    with torch.no_grad():
        assert not torch.allclose(model(ids)[0][0, 0], model(far)[0][0, 0])  # attention reaches it
        model.embedding.weight[PAD] = 100.0
        torch.testing.assert_close(model(torch.tensor([[5, 6, 7, PAD]]))[0][:, :3], model(torch.tensor([[5, 6, 7]]))[0])
    model.train()
    _, loss = model(ids, torch.randint(2, 50, (1, 12)))
    loss.backward()
    assert all(p.grad is not None for p in model.attention.parameters())


def test_attention_heads_must_divide_the_width():
    from couplet.core.config import ConfigError, apply_overrides

    with pytest.raises(ConfigError, match=r"^model: model\.attn_heads \(3\) must divide model\.embed_dim \(128\)$"):
        apply_overrides(Config(), ["model.kind=attention", "model.attn_heads=3"])


def test_a_folder_records_the_kind_of_its_weights(tmp_path):
    vocab = Vocab.from_counts({ch: 1 for ch in "".join(u + d for u, d in PAIRS)}, min_count=1)
    config = Config(model=SMALL.model_copy(update={"kind": "attention"}))  # says attention; the weights are the seed's
    save_labeller(tiny_model(len(vocab)), vocab, config, tmp_path / "m")
    model, _, loaded = load_labeller(tmp_path / "m")
    assert type(model) is CoupletLabeller and loaded.model.kind == "gated_cnn"


def test_each_kind_saves_and_loads_with_its_kind(tmp_path):
    from couplet.core.config import replace
    from couplet.modelling.model import LABELLERS, build_labeller

    vocab = Vocab.from_counts({ch: 1 for ch in "".join(u + d for u, d in PAIRS)}, min_count=1)
    ids = torch.tensor([vocab.encode(PAIRS[0][0])])
    for kind, cls in LABELLERS.items():
        config = replace(Config(model=SMALL), "model", kind=kind)
        model = build_labeller(len(vocab), config.model).eval()
        save_labeller(model, vocab, config, tmp_path / kind)
        loaded, _, loaded_config = load_labeller(tmp_path / kind)
        assert type(loaded) is cls and loaded_config.model.kind == kind
        torch.testing.assert_close(loaded.log_probs(ids), model.log_probs(ids))


def test_a_folder_without_kind_or_lm_weight_keeps_the_former_defaults(tmp_path):
    vocab = Vocab.from_counts({ch: 1 for ch in "".join(u + d for u, d in PAIRS)}, min_count=1)
    save_labeller(tiny_model(len(vocab)), vocab, Config(model=SMALL), tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    del raw["model"]["kind"], raw["decode"]["lm_weight"], raw["decode"]["beam_size"]  # as an older version wrote it
    for key in ("lr_schedule", "warmup_steps", "ema_decay", "max_minutes"):
        del raw["train"][key]
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    model, _, config = load_labeller(tmp_path / "m")
    assert type(model) is CoupletLabeller and config.model.kind == "gated_cnn" and config.decode.lm_weight == 0.0
    t = config.train  # how such a folder was trained, whatever the defaults are now
    assert (t.lr_schedule, t.warmup_steps, t.ema_decay, t.max_minutes) == ("constant", 0, None, None)


def test_unknown_kind_is_a_one_line_config_error():
    from couplet.core.config import ConfigError, apply_overrides

    with pytest.raises(ConfigError, match=r"^model\.kind: .*gated_cnn.*refine"):
        apply_overrides(Config(), ["model.kind=lstm"])


def test_every_configurable_kind_has_its_labeller_class():
    from couplet.core.config import MODEL_KINDS, ModelConfig
    from couplet.modelling.model import LABELLERS, build_labeller

    assert tuple(LABELLERS) == MODEL_KINDS  # config.py names the kinds; model.py refuses to import otherwise
    for kind in MODEL_KINDS:
        model = build_labeller(10, ModelConfig(kind=kind, embed_dim=8, attn_heads=2, word_features=False))
        assert type(model) is LABELLERS[kind] and model.kind == kind


# --------------------------------------------------------------------------- the direction marker (model.directions)


@pytest.mark.parametrize("kind", ["gated_cnn", "refine", "attention"])
def test_the_direction_embedding_exists_only_with_two_directions(kind):
    from couplet.modelling.model import build_labeller

    cfg = SMALL.model_copy(update={"kind": kind, "attn_heads": 4, "dropout": 0.0})
    torch.manual_seed(0)
    one = build_labeller(50, cfg.model_copy(update={"directions": 1}))
    torch.manual_seed(0)
    two = build_labeller(50, cfg.model_copy(update={"directions": 2}))
    assert "direction.weight" not in one.state_dict() and two.state_dict()["direction.weight"].shape == (2, 32)
    assert set(two.state_dict()) - set(one.state_dict()) == {"direction.weight"}
    for name, tensor in one.state_dict().items():  # the marker draws no random numbers: the rest starts the same
        assert torch.equal(tensor, two.state_dict()[name]), name
    ids = torch.randint(2, 50, (3, 6))
    torch.testing.assert_close(two.log_probs(ids), one.log_probs(ids))  # zero at first: no change yet
    with torch.no_grad():
        two.direction.weight.normal_()
    down, up = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    torch.testing.assert_close(two.log_probs(ids), two.log_probs(ids, direction=down))  # None means "down"
    assert not torch.allclose(two.log_probs(ids, direction=up), two.log_probs(ids, direction=down))
    mixed = two.log_probs(ids, direction=torch.tensor([0, 1, 0]))  # per row
    torch.testing.assert_close(mixed[1], two.log_probs(ids, direction=up)[1])
    torch.testing.assert_close(mixed[2], two.log_probs(ids)[2])
    _, loss = two(ids, targets=ids, direction=up)
    loss.backward()
    assert two.direction.weight.grad[1].abs().sum() > 0 and two.direction.weight.grad[0].abs().sum() == 0
    with pytest.raises(ValueError, match="only upper -> lower"):
        one.log_probs(ids, direction=up)


def test_a_folder_written_before_directions_loads_without_the_marker(tmp_path):
    vocab = Vocab.from_counts({ch: 1 for ch in "".join(u + d for u, d in PAIRS)}, min_count=1)
    old = SMALL.model_copy(update={"directions": 1})
    save_labeller(tiny_model(len(vocab), directions=1), vocab, Config(model=old), tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    del raw["model"]["directions"], raw["train"]["swapped_pairs"]  # as an older version wrote it
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    model, _, config = load_labeller(tmp_path / "m")
    assert config.model.directions == 1 and config.train.swapped_pairs is False and model.direction is None
    assert "direction.weight" not in model.state_dict()
