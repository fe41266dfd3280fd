"""CaptionModel: Show and Tell (Vinyals et al. 2015). The image is the LSTM's first input, then the words.

    feature -> Linear(feature_dim, embed_dim) [-> BatchNorm1d] -> x_{-1}
    <start> w1 ... wn -> Embedding (padding_idx=<pad>) -> x_0 ... x_n
    LSTM over x_{-1} x_0 ... x_n (from a zero state) -> Linear(hidden_dim, vocab_size)

The output at the image step is not used; the output after <start> predicts w1, and so on. Training
(`forward`, `loss`) and decoding (`init_state`, then `step` per token) run exactly the same computation, so
decoding starts from the same deterministic state the model was trained with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from showtell.config import DECODERS
from showtell.errors import ShowtellError
from showtell.limits import MAX_DIM, MAX_LAYERS, MAX_MEMBERS, MAX_VOCAB_SIZE, check_int
from showtell.vocab import SPECIAL

State = tuple[Tensor, Tensor]  # LSTM (h, c), each [num_layers, B, hidden_dim]
SHOW_AND_TELL, ATTENTION = DECODERS  # ATTENTION: showtell.attention, Show, Attend and Tell
MAX_GRID = 64  # side of an attention model's feature map (registered encoders: 7 and 9)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a CaptionModel; stored in checkpoints as JSON (`to_dict`)."""

    vocab_size: int
    feature_dim: int  # size of the encoder's feature vector (e.g. 1280)
    embed_dim: int = 256
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5  # on the word embeddings, the LSTM output and between layers
    image_dropout: float | None = None  # on the projected image, the LSTM's first input; None: as ``dropout``
    batch_norm: bool = False  # BatchNorm1d after the image projection (yunjey's pytorch-tutorial layout)
    decoder: str = SHOW_AND_TELL  # or ATTENTION: soft attention over the encoder's feature map (showtell.attention)
    grid: int | None = None  # ATTENTION only: the side of the feature map it attends over (the encoder's "grid")

    def __post_init__(self) -> None:
        # bounded (showtell.limits), so that a checkpoint cannot ask for a model that exhausts memory;
        # vocab_size >= 4: <pad> <start> <end> <unk>
        for name, low, high in (("vocab_size", 4, MAX_VOCAB_SIZE), ("feature_dim", 1, MAX_DIM),
                                ("embed_dim", 1, MAX_DIM), ("hidden_dim", 1, MAX_DIM), ("num_layers", 1, MAX_LAYERS)):
            check_int(f"model config: {name}", getattr(self, name), low, high)
        for name in ("dropout", "image_dropout"):
            value = getattr(self, name)
            if value is None and name == "image_dropout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ShowtellError(f"model config: {name} must be in [0, 1), got {value!r}")
        if not isinstance(self.batch_norm, bool):
            raise ShowtellError(f"model config: batch_norm must be true or false, got {self.batch_norm!r}")
        if self.decoder not in DECODERS:
            raise ShowtellError(f"model config: decoder must be {' or '.join(DECODERS)}, got {self.decoder!r}")
        if self.decoder == ATTENTION:
            check_int("model config: grid", self.grid, 1, MAX_GRID)
            if self.num_layers != 1 or self.batch_norm:
                raise ShowtellError("model config: the attention decoder has one LSTM layer and no batch norm")
        elif self.grid is not None:
            raise ShowtellError(f"model config: grid is for the attention decoder, not {self.decoder}")

    @property
    def spatial(self) -> bool:
        """Whether the model reads the encoder's feature map [B, grid * grid, feature_dim], not pooled features."""
        return self.decoder == ATTENTION

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.decoder == SHOW_AND_TELL:  # Show-and-Tell checkpoints and exports keep the record they always had
            del d["decoder"], d["grid"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise ShowtellError(f"model config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ShowtellError(f"model config: unknown key(s) {', '.join(unknown)}")
        missing = sorted(f.name for f in fields(cls) if f.name in ("vocab_size", "feature_dim") and f.name not in d)
        if missing:
            raise ShowtellError(f"model config: missing key(s) {', '.join(missing)}")
        return cls(**d)


def model_class(config: ModelConfig) -> type[nn.Module]:
    """The model class a config describes: CaptionModel, or showtell.attention.AttentionModel."""
    if config.decoder == ATTENTION:
        from showtell.attention import AttentionModel
        return AttentionModel
    return CaptionModel


def create_model(config: ModelConfig) -> nn.Module:
    return model_class(config)(config)


class CaptionModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.image_proj = nn.Linear(c.feature_dim, c.embed_dim)
        self.image_norm = nn.BatchNorm1d(c.embed_dim) if c.batch_norm else None
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=SPECIAL.pad)
        self.drop = nn.Dropout(c.dropout)
        self.image_drop = nn.Dropout(c.dropout if c.image_dropout is None else c.image_dropout)
        self.lstm = nn.LSTM(c.embed_dim, c.hidden_dim, c.num_layers, batch_first=True,
                            dropout=c.dropout if c.num_layers > 1 else 0.0)
        self.head = nn.Linear(c.hidden_dim, c.vocab_size)

    @staticmethod
    def state_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of ``state_dict()``, from the config alone: what a checkpoint must store, known
        before building anything (a meta-device model would do, but its first use imports torch._dynamo, ~3 s)."""
        shapes: dict[str, tuple[int, ...]] = {"image_proj.weight": (c.embed_dim, c.feature_dim),
                                              "image_proj.bias": (c.embed_dim,)}
        if c.batch_norm:
            norm = ("weight", "bias", "running_mean", "running_var")
            shapes.update({f"image_norm.{k}": (c.embed_dim,) for k in norm})
            shapes["image_norm.num_batches_tracked"] = ()
        shapes["embed.weight"] = (c.vocab_size, c.embed_dim)
        gates = 4 * c.hidden_dim
        for k in range(c.num_layers):
            shapes.update({f"lstm.weight_ih_l{k}": (gates, c.embed_dim if k == 0 else c.hidden_dim),
                           f"lstm.weight_hh_l{k}": (gates, c.hidden_dim),
                           f"lstm.bias_ih_l{k}": (gates,), f"lstm.bias_hh_l{k}": (gates,)})
        shapes.update({"head.weight": (c.vocab_size, c.hidden_dim), "head.bias": (c.vocab_size,)})
        return shapes

    def _image_input(self, features: Tensor) -> Tensor:
        """[B, feature_dim] -> the LSTM's first input [B, 1, embed_dim]."""
        x = self.image_proj(features.to(self.image_proj.weight.dtype))
        norm = self.image_norm
        if norm is not None and self.training and x.shape[0] == 1:
            # a batch of one (a rare caption length): training-mode BatchNorm cannot take it, use running stats
            x = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        elif norm is not None:
            x = norm(x)
        return self.image_drop(x).unsqueeze(1)

    def _hidden(self, features: Tensor, captions: Tensor) -> Tensor:
        """LSTM outputs [B, T-1, hidden]: position t has read the image and captions[:, :t+1]."""
        words = self.drop(self.embed(captions[:, :-1]))
        out, _ = self.lstm(torch.cat([self._image_input(features), words], dim=1))
        return out[:, 1:]

    def forward(self, features: Tensor, captions: Tensor) -> Tensor:
        """Teacher forcing. captions [B, T] = <start> w1 .. wn <end> <pad>..; logits [B, T-1, vocab]
        where position t predicts captions[:, t+1]."""
        return self.head(self.drop(self._hidden(features, captions)))

    def loss(self, features: Tensor, captions: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Mean cross-entropy over the non-<pad> targets. The output projection (the costly part with a large
        vocabulary) runs only on those positions."""
        targets = captions[:, 1:]
        mask = targets != SPECIAL.pad
        hidden = self._hidden(features, captions)[mask]  # [N, hidden]
        logits = self.head(self.drop(hidden))
        return F.cross_entropy(logits.float(), targets[mask], label_smoothing=label_smoothing)

    def init_state(self, features: Tensor) -> State:
        """The LSTM state after reading the image from a zero state (the same start as in training)."""
        _, state = self.lstm(self._image_input(features))
        return state

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Read one token per sequence: tokens [B] -> logits [B, vocab] for the next token, and the new state."""
        out, state = self.lstm(self.drop(self.embed(tokens)).unsqueeze(1), state)
        return self.head(self.drop(out[:, 0])), state


class Ensemble(nn.Module):
    """Several CaptionModels of one config, trained apart, that decode as one model: each next-word distribution
    is the mean of the members' distributions. The members' LSTM states are stacked along the layer axis, so the
    state has one model's shape with ``members * num_layers`` layers and decoders, batching and ONNX export handle
    it unchanged."""

    def __init__(self, config: ModelConfig, members: int):
        super().__init__()
        if isinstance(members, bool) or not isinstance(members, int) or members < 2:
            raise ShowtellError(f"an ensemble needs at least 2 members, got {members!r}")
        if members > MAX_MEMBERS:
            raise ShowtellError(f"an ensemble of {members} members; at most {MAX_MEMBERS} are supported")
        if config.decoder != SHOW_AND_TELL:
            raise ShowtellError(f"ensembles are of {SHOW_AND_TELL} models; an {config.decoder} decoder cannot join one")
        self.config = config
        self.members = nn.ModuleList(CaptionModel(config) for _ in range(members))

    @staticmethod
    def state_shapes(config: ModelConfig, members: int) -> dict[str, tuple[int, ...]]:
        one = CaptionModel.state_shapes(config)
        return {f"members.{i}.{k}": shape for i in range(members) for k, shape in one.items()}

    @classmethod
    def of(cls, models: list[CaptionModel]) -> Ensemble:
        """Fold trained models (one config) into one ensemble."""
        # dropout does not change a trained model
        configs = {replace(m.config, dropout=0.0, image_dropout=0.0) for m in models}
        if len(configs) != 1:
            raise ShowtellError("ensemble members must share one model config (sizes, vocabulary, encoder features)")
        ensemble = cls(models[0].config, len(models))
        for target, source in zip(ensemble.members, models):
            target.load_state_dict(source.state_dict())
        return ensemble

    def init_state(self, features: Tensor) -> State:
        states = [m.init_state(features) for m in self.members]
        return torch.cat([h for h, _ in states]), torch.cat([c for _, c in states])

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Log of the members' mean next-word probability [B, vocab] (normalised log-probabilities are valid
        logits), and the new stacked state."""
        layers = self.config.num_layers
        logits, hs, cs = [], [], []
        for member, h, c in zip(self.members, state[0].split(layers), state[1].split(layers)):
            out, (h, c) = member.step(tokens, (h, c))
            logits.append(out)
            hs.append(h)
            cs.append(c)
        logprobs = F.log_softmax(torch.stack(logits).float(), dim=-1)  # the members' at once: fewer ops a step
        mean = torch.logsumexp(logprobs, dim=0) - math.log(len(self.members))
        return mean, (torch.cat(hs), torch.cat(cs))
