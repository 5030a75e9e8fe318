"""The couplet labeller: a character gated-CNN that labels each upper-line position with its lower-line character.

Su Jianlin (2019), "基于CNN和序列标注的对联机器人": both lines of a couplet have the same length, so generating
the lower line is sequence labelling. Embedding (128) -> dropout 0.25 -> 6 residual gated conv blocks -> a
per-position softmax over the vocabulary. The model and its files live here, nanoGPT style; the speed
kernels it calls (fused output layer + loss, convolution as a matmul) are in couplet/modelling/kernels.py.

model.output picks the output layer: "full", one linear layer + softmax over the vocabulary (the seed), or
"adaptive", torch's nn.AdaptiveLogSoftmaxWithLoss over the frequency-sorted vocabulary (a head for the most
frequent ids, tail clusters behind their own projections; exact log-probabilities, cheaper training on CPU).
Either way the module is `head` (and `refine_head`), so a full model's state dict is as before.

With model.directions=2 a learnt direction embedding (row 0 "down": upper -> lower, row 1 "up": lower -> upper)
is added to the character embedding at every position, so one model answers both ways (train.swapped_pairs);
with directions=1 (folders written before the field) there is no such parameter and the state dict is as before.
With model.word_features a learnt embedding of each input character's jieba word tag (couplet/data/wordtags.py) is
added the same way; `tags` (B, L) travels beside the ids. Off: no such parameter, as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from couplet.core.atomic import atomic_path, atomic_write_json
from couplet.core.catalog import MODEL_FILES
from couplet.core.config import MODEL_KINDS, Config, ModelConfig, config_from_dict, with_former_defaults
from couplet.modelling.kernels import (
    SMALL_INFERENCE_POSITIONS,
    adaptive_log_probs,
    conv1d_same_as_matmul,
    conv1d_same_train,
    fused_linear_cross_entropy,
)
from couplet.data.vocab import PAD, Vocab
from couplet.data.wordtags import N_TAGS


class GatedConvBlock(nn.Module):
    """Residual gated convolution: h = conv(x) split into g, c; out = x*sigmoid(g) + c*sigmoid(-g).

    Works channels-first, (B, d, L), the layout Conv1d wants, so a stack of blocks needs no transposes.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.dim = dim
        self.conv = nn.Conv1d(dim, 2 * dim, kernel_size, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a few positions at inference (an interactive request): the same convolution as one matmul, faster there
        grad = torch.is_grad_enabled()
        small = x.shape[0] * x.shape[2] <= SMALL_INFERENCE_POSITIONS and not grad
        if small:
            h = conv1d_same_as_matmul(x, self.conv.weight, self.conv.bias)  # (B, 2d, L)
        elif grad and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            # CPU fp32 training: the matmul with its own backward, ~1.8x faster than oneDNN's (kernels.py)
            h = conv1d_same_train(x, self.conv.weight, self.conv.bias)
        else:
            h = self.conv(x)
        g, c = h[:, : self.dim], h[:, self.dim :]  # (B, d, L) each: gate first, candidate second
        # x*s(g) + c*s(-g) == c + (x - c)*s(g) because s(-g) = 1 - s(g): one sigmoid instead of two
        return torch.lerp(c, x.to(c.dtype), torch.sigmoid(g))  # (B, d, L); the cast matters under autocast


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A stack of gated blocks over x (B, L, d) -> (B, L, d), zero at the PAD positions of ids (B, L)."""
    mask = (ids != PAD).unsqueeze(1)  # (B, 1, L)
    has_pad = not bool(mask.all())  # equal-length training batches skip the masking multiplies
    x = x.transpose(1, 2)  # (B, d, L)
    for block in blocks:
        if has_pad:
            x = x * mask  # PAD positions are zero before every conv, so they never leak into neighbours
        x = block(x)  # (B, d, L)
    if has_pad:
        x = x * mask
    return x.transpose(1, 2)  # (B, L, d)


OutputLayer = nn.Linear | nn.AdaptiveLogSoftmaxWithLoss  # model.output "full" | "adaptive"


def adaptive_cutoffs(vocab_size: int, shares: tuple[float, ...]) -> list[int]:
    """The ids where the adaptive head and each tail cluster end: `shares` of vocab_size, rounded, kept in
    [1, vocab_size - 1] and deduplicated (a tiny vocabulary gets fewer clusters, at least one)."""
    return sorted({min(max(1, round(share * vocab_size)), vocab_size - 1) for share in shares})


def build_output(vocab_size: int, cfg: ModelConfig) -> OutputLayer:
    """The output layer model.output asks for, features (.., d) -> the vocabulary."""
    if cfg.output == "full":
        return nn.Linear(cfg.embed_dim, vocab_size)
    if vocab_size < 2:
        raise ValueError(f"model.output=adaptive needs a vocabulary of at least 2 ids, got {vocab_size}")
    cutoffs = adaptive_cutoffs(vocab_size, cfg.adaptive_cutoffs)
    layer = nn.AdaptiveLogSoftmaxWithLoss(cfg.embed_dim, vocab_size, cutoffs, div_value=cfg.adaptive_div, head_bias=True)
    with torch.no_grad():  # each cluster's head entry starts with its share of ids, as a full softmax's would
        sizes = torch.tensor([b - a for a, b in zip(layer.cutoffs, layer.cutoffs[1:])], dtype=torch.float32)
        layer.head.bias[layer.shortlist_size :] += sizes.log()
    return layer


def output_scores(x: torch.Tensor, head: OutputLayer) -> torch.Tensor:
    """Scores over the vocabulary for features x (.., d) -> (.., V): a full layer's logits, an adaptive layer's
    log-probabilities (already normalised; a softmax of them is the same distribution)."""
    if isinstance(head, nn.Linear):
        return head(x)
    flat = x.reshape(-1, x.size(-1))
    scores = head.log_prob(flat) if torch.is_grad_enabled() else adaptive_log_probs(flat, head)
    return scores.reshape(*x.shape[:-1], head.n_classes)


def adaptive_loss(x: torch.Tensor, head: nn.AdaptiveLogSoftmaxWithLoss, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over non-PAD positions of the adaptive layer `head` on features x (B, L, d).

    The same value as `head(x, targets).loss` on the non-PAD rows, but every tail cluster runs (on no rows if the
    batch has none of its ids), so each parameter gets a gradient every step: DistributedDataParallel needs that.
    """
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)  # (N, d), (N,)
    keep = targets != PAD
    x, targets = x[keep], targets[keep]  # (n, d), (n,)
    ends = torch.tensor(head.cutoffs[:-1], device=targets.device)
    cluster = torch.bucketize(targets, ends, right=True)  # (n,) 0: the head's own ids, i: tail cluster i
    head_targets = torch.where(cluster == 0, targets, head.shortlist_size + cluster - 1)  # cluster i's head entry
    nll = F.cross_entropy(head.head(x).float(), head_targets, reduction="none")  # (n,)
    for i, tail in enumerate(head.tail):
        rows = (cluster == i + 1).nonzero().squeeze(1)  # (m,)
        inner = F.cross_entropy(tail(x[rows]).float(), targets[rows] - head.cutoffs[i], reduction="none")  # (m,)
        nll = nll.index_add(0, rows, inner)
    return nll.sum() / max(len(targets), 1)


def head_loss(x: torch.Tensor, head: OutputLayer, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over non-PAD positions of the output layer `head` on features x (B, L, d)."""
    if isinstance(head, nn.AdaptiveLogSoftmaxWithLoss):
        return adaptive_loss(x, head, targets)
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)  # (N, d), (N,)
    if x.is_cuda:  # GPU memory is plentiful and autocast handles dtypes: the stock loss is fine there
        return F.cross_entropy(head(x).float(), targets, ignore_index=PAD)
    amp = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return fused_linear_cross_entropy(x, head.weight, head.bias, targets, matmul_dtype=amp)


class CoupletLabeller(nn.Module):
    """Upper-line ids (B, L) -> lower-line logits (B, L, V)."""

    kind = "gated_cnn"  # its model.kind (couplet.core.config.ModelKind)

    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        self.vocab_size = vocab_size
        self.cfg = cfg
        self.embedding = nn.Embedding(vocab_size, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GatedConvBlock(cfg.embed_dim, cfg.kernel_size) for _ in range(cfg.n_blocks))
        self.head = build_output(vocab_size, cfg)  # nn.Linear for model.output=full, as in the seed
        # zero at first and drawing no random numbers, so every other parameter starts as in a model without it
        self.direction = nn.Embedding(2, cfg.embed_dim, _weight=torch.zeros(2, cfg.embed_dim)) if cfg.directions == 2 else None
        # model.word_features: the same, one row per word tag (row 0, PAD, stays zero: padding_idx)
        self.word_tags = (nn.Embedding(N_TAGS, cfg.embed_dim, padding_idx=0, _weight=torch.zeros(N_TAGS, cfg.embed_dim))
                          if cfg.word_features else None)

    def embed(self, ids: torch.Tensor, direction: torch.Tensor | None = None, tags: torch.Tensor | None = None) -> torch.Tensor:
        """The character embedding of ids (B, L), plus the direction's (B,) embedding with model.directions=2
        (direction None: all 0, "down") and the word tags' (B, L) with model.word_features; (B, L, d), before dropout."""
        x = self.embedding(ids)  # (B, L, d)
        if self.word_tags is not None:  # a model without the feature ignores tags: it never learnt them
            x = x + self._tag_embedding(ids, tags)
        if self.direction is None:
            if direction is not None and bool(direction.any()):
                raise ValueError("this model has no direction marker (model.directions=1): it answers only upper -> lower")
            return x
        if direction is None:
            return x + self.direction.weight[0]  # (d,) broadcast: every row "down"
        return x + self.direction(direction).unsqueeze(1)  # (B, 1, d)

    def _tag_embedding(self, ids: torch.Tensor, tags: torch.Tensor | None) -> torch.Tensor:
        """The word tags' embedding (B, L, d) (model.word_features); tags shaped like the ids are required."""
        if tags is None or tags.shape != ids.shape:
            raise ValueError(f"this model reads each character's word tag (model.word_features): pass tags shaped like the "
                             f"ids {tuple(ids.shape)} (couplet.data.wordtags.tag_matrix)")
        return self.word_tags(tags.long())

    def features(self, ids: torch.Tensor, direction: torch.Tensor | None = None, tags: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's output, (B, L, d), zero at PAD positions."""
        return run_blocks(self.blocks, self.dropout(self.embed(ids, direction, tags)), ids)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, direction: torch.Tensor | None = None,
                tags: torch.Tensor | None = None):
        """ids (B, L) int64 -> (logits (B, L, V), None), or with targets (B, L) -> (None, mean loss over non-PAD).
        With model.output=adaptive the "logits" are the exact log-probabilities (log_softmax leaves them as they are).
        `direction` (B,) int64: 0 "down" (upper -> lower), 1 "up" (lower -> upper, model.directions=2); None: all 0.
        `tags` (B, L): the input line's word tags, which a model with model.word_features needs (others ignore them).

        With targets the logits are not materialised for the caller: on CPU the loss is fused with the
        output layer (see couplet.modelling.kernels.fused_linear_cross_entropy). Call without targets, or use log_probs, for logits.
        """
        x = self.features(ids, direction, tags)  # (B, L, d)
        if targets is None:
            return output_scores(x, self.head), None  # (B, L, V)
        return None, head_loss(x, self.head, targets)

    @torch.no_grad()
    def log_probs(self, ids: torch.Tensor, direction: torch.Tensor | None = None, tags: torch.Tensor | None = None) -> torch.Tensor:
        """Log-softmax over the vocabulary, (B, L, V), in eval mode; PAD/UNK are not masked here. `direction`, `tags` as in forward."""
        was_training = self.training
        if was_training:  # train()/eval() walk every submodule: ~0.3 ms a call, so only when needed
            self.eval()
        try:
            scores, _ = self(ids, direction=direction, tags=tags)
            if isinstance(self.head, nn.AdaptiveLogSoftmaxWithLoss):  # already log-probabilities
                return scores.float()
            return F.log_softmax(scores.float(), dim=-1)
        finally:
            if was_training:
                self.train()


class RefiningLabeller(CoupletLabeller):
    """kind "refine": the seed labeller drafts a lower line; `refine_blocks` more gated blocks relabel every
    position from the upper line's features plus the embedding of the draft's characters, so each position
    finally sees its neighbours' lower characters, both sides of it.

    The draft is the first pass's own arg-max (detached) in training as in use: the relabelling pass learns to
    fix the drafts it will really get, so there is no exposure bias. Training loss = draft loss + final loss;
    in eval mode the loss is the final pass's alone, comparable with the seed's.
    """

    kind = "refine"

    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__(vocab_size, cfg)
        self.draft_embedding = nn.Embedding(vocab_size, cfg.embed_dim)
        self.refine_blocks = nn.ModuleList(GatedConvBlock(cfg.embed_dim, cfg.kernel_size) for _ in range(cfg.refine_blocks))
        self.refine_head = build_output(vocab_size, cfg)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, direction: torch.Tensor | None = None,
                tags: torch.Tensor | None = None):
        x = self.features(ids, direction, tags)  # (B, L, d)
        full = isinstance(self.head, nn.Linear)
        draft_logits = output_scores(x, self.head) if full else None  # (B, L, V)
        if full:
            draft = draft_logits.argmax(-1)  # (B, L): no gradient flows through the choice
        else:
            with torch.no_grad():
                draft = output_scores(x, self.head).argmax(-1)
        y = run_blocks(self.refine_blocks, x + self.draft_embedding(draft), ids)  # (B, L, d)
        if targets is None:
            return output_scores(y, self.refine_head), None
        final = head_loss(y, self.refine_head, targets)
        if not self.training:
            return None, final
        if full:
            draft_loss = F.cross_entropy(draft_logits.reshape(-1, self.vocab_size).float(), targets.reshape(-1), ignore_index=PAD)
        else:
            draft_loss = adaptive_loss(x, self.head, targets)
        return None, draft_loss + final


class AttentionLabeller(CoupletLabeller):
    """kind "attention": the seed's gated blocks (local context and, through their padding, position), then
    `attn_layers` bidirectional self-attention layers (pre-norm Transformer encoder layers), so every position
    sees the whole upper line: a couplet's second clause can answer to its first however far apart they are.
    """

    kind = "attention"

    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__(vocab_size, cfg)
        self.attention = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.embed_dim, cfg.attn_heads, dim_feedforward=2 * cfg.embed_dim, dropout=cfg.attn_dropout,
                                       batch_first=True, norm_first=True)
            for _ in range(cfg.attn_layers)
        )

    def features(self, ids: torch.Tensor, direction: torch.Tensor | None = None, tags: torch.Tensor | None = None) -> torch.Tensor:
        x = super().features(ids, direction, tags)  # (B, L, d), zero at PAD
        pad = ids == PAD  # (B, L)
        padding_mask = pad if bool(pad.any()) else None  # equal-length training batches need no mask
        for layer in self.attention:
            x = layer(x, src_key_padding_mask=padding_mask)  # (B, L, d)
        return x.masked_fill(pad.unsqueeze(-1), 0.0) if padding_mask is not None else x


LABELLERS: dict[str, type[CoupletLabeller]] = {cls.kind: cls for cls in (CoupletLabeller, RefiningLabeller, AttentionLabeller)}
if tuple(LABELLERS) != MODEL_KINDS:  # config validates model.kind against MODEL_KINDS and cannot import this module
    raise ImportError(f"couplet.core.config.MODEL_KINDS {MODEL_KINDS} and the labeller classes {tuple(LABELLERS)} disagree")


def build_labeller(vocab_size: int, cfg: ModelConfig) -> CoupletLabeller:
    """A freshly initialised labeller of the configured kind."""
    return LABELLERS[cfg.kind](vocab_size, cfg)


def save_labeller(model: CoupletLabeller, vocab: Vocab, config: Config, model_dir: str | Path) -> None:
    """Write model.safetensors (state_dict), vocab.json and config.json (+ vocab_size), each atomically."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    if config.model.kind != model.kind:  # the folder records what the weights are, whatever the config said
        config = config.model_copy(update={"model": config.model.model_copy(update={"kind": model.kind})})
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(model_dir / MODEL_FILES.weights) as tmp:
        save_file(state, str(tmp))
    vocab.save(model_dir / MODEL_FILES.vocab)
    atomic_write_json(model_dir / MODEL_FILES.config, {**config.to_dict(), "vocab_size": len(vocab)})


def load_labeller(model_dir: str | Path, device: str = "cpu") -> tuple[CoupletLabeller, Vocab, Config]:
    """Read a model dir written by save_labeller; returns the model in eval mode on `device`."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    raw = json.loads((model_dir / MODEL_FILES.config).read_text(encoding="utf-8"))
    vocab_size = int(raw.pop("vocab_size"))
    raw = with_former_defaults(raw)  # a folder written before a field existed meant the field's former value
    config = config_from_dict(raw, drop_unknown=True)  # a folder from another version may hold fields since removed
    vocab = Vocab.load(model_dir / MODEL_FILES.vocab)
    if len(vocab) != vocab_size:
        raise ValueError(f"{model_dir}: vocab.json has {len(vocab)} entries, config.json says {vocab_size}")
    # built on CPU (random init costs ~10 ms; a meta-device build imports torch._refs, ~2 s), then the file's
    # tensors are assigned in place of the random ones
    model = build_labeller(vocab_size, config.model)
    weights = model_dir / MODEL_FILES.weights
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError) for a cut or garbled file
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"{weights} is damaged ({reason}): retrain it (couplet run --force train) or restore the file") from None
    model.load_state_dict(state, assign=True)
    return model.to(device).eval(), vocab, config
