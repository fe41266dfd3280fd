"""AttentionModel: Show, Attend and Tell (Xu et al. 2015), soft attention, beside Show and Tell's CaptionModel.

The encoder's last feature map a [B, L, D] (L = grid * grid positions) stays with the decoder. Each step attends
over it with the previous hidden state, and the LSTM reads the word and the attended context:

    h_0, c_0 = tanh(W_h mean(a)), tanh(W_c mean(a))
    alpha_t  = softmax_L(w . tanh(W_a a + U_a h_{t-1}))          where it looks for word t
    z_t      = sigmoid(f_beta(h_{t-1})) * sum_L alpha_t a         the gate of section 4.2.1
    h_t, c_t = LSTMCell([E y_{t-1}; z_t], (h_{t-1}, c_{t-1}))
    p(y_t)   = softmax(W_o dropout(h_t))

Training adds the doubly stochastic regularisation (eq. 14): sum over positions of (1 - sum over words of alpha)^2,
which asks the caption to look at every part of the photo about once; weighted by ``ATTENTION_REG`` (1, as in
sgrvinod's tutorial) and averaged over the batch and the positions. It has the step interface of
``showtell.decoding.StepModel``: the state is (h, c, map, keys), each with the batch in dimension 1, so greedy,
beam search and sampling (SCST) run it unchanged. ``attention_maps`` gives, for decoded captions, the map each word
was chosen with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from showtell.errors import ShowtellError
from showtell.model import ATTENTION, ModelConfig
from showtell.vocab import SPECIAL, SpecialTokens

ATTENTION_REG = 1.0  # weight of the doubly stochastic regularisation (Xu et al.'s lambda)
State = tuple[Tensor, Tensor, Tensor, Tensor]  # h, c [1, B, hidden]; map [L, B, feature_dim]; keys [L, B, hidden]


class AttentionModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.decoder != ATTENTION:
            raise ShowtellError(f"AttentionModel needs decoder {ATTENTION!r}, got {config.decoder!r}")
        self.config = c = config
        d, h, a = c.feature_dim, c.hidden_dim, c.hidden_dim  # attention size = hidden size
        self.init_h, self.init_c = nn.Linear(d, h), nn.Linear(d, h)
        self.feature_att, self.hidden_att, self.att = nn.Linear(d, a), nn.Linear(h, a), nn.Linear(a, 1)
        self.gate = nn.Linear(h, d)
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=SPECIAL.pad)
        self.cell = nn.LSTMCell(c.embed_dim + d, h)
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(h, c.vocab_size)

    @staticmethod
    def state_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of ``state_dict()``, from the config alone (see CaptionModel.state_shapes)."""
        d, h, e = c.feature_dim, c.hidden_dim, c.embed_dim
        linears = {"init_h": (h, d), "init_c": (h, d), "feature_att": (h, d), "hidden_att": (h, h), "att": (1, h),
                   "gate": (d, h)}
        shapes: dict[str, tuple[int, ...]] = {}
        for name, (out, inp) in linears.items():
            shapes.update({f"{name}.weight": (out, inp), f"{name}.bias": (out,)})
        shapes["embed.weight"] = (c.vocab_size, e)
        shapes.update({"cell.weight_ih": (4 * h, e + d), "cell.weight_hh": (4 * h, h), "cell.bias_ih": (4 * h,),
                       "cell.bias_hh": (4 * h,)})
        shapes.update({"head.weight": (c.vocab_size, h), "head.bias": (c.vocab_size,)})
        return shapes

    def _check(self, features: Tensor) -> None:
        g, d = self.config.grid, self.config.feature_dim
        if features.dim() != 3 or features.shape[1:] != (g * g, d):
            raise ShowtellError(f"the attention decoder reads feature maps [images, {g * g}, {d}] ({g} x {g} "
                                f"positions), got features of shape {list(features.shape)}; pooled features (a "
                                "Show-and-Tell feature cache) cannot be used")

    def _start(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """features [B, L, D] -> (map, keys [B, L, hidden], h_0, c_0)."""
        self._check(features)
        a = features.to(self.head.weight.dtype)
        mean = a.mean(1)
        return a, self.feature_att(a), torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))

    def _advance(self, tokens: Tensor, a: Tensor, keys: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Read one token per sequence: the attention alpha [B, L] it looked with, then the new (h, c)."""
        scores = self.att(torch.tanh(keys + self.hidden_att(h).unsqueeze(1))).squeeze(2)  # [B, L]
        alpha = scores.float().softmax(dim=1).to(a.dtype)
        context = torch.bmm(alpha.unsqueeze(1), a).squeeze(1) * torch.sigmoid(self.gate(h))  # [B, D]
        x = torch.cat([self.drop(self.embed(tokens)), context.to(h.dtype)], dim=1)
        h, c = self.cell(x, (h, c))
        return alpha, h, c

    def _run(self, features: Tensor, captions: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing over captions [B, T]: hidden states [B, T-1, hidden] (position t has read
        captions[:, :t+1]) and the attention each used [B, T-1, L]."""
        a, keys, h, c = self._start(features)
        hs, alphas = [], []
        for t in range(captions.shape[1] - 1):
            alpha, h, c = self._advance(captions[:, t], a, keys, h, c)
            hs.append(h)
            alphas.append(alpha)
        return torch.stack(hs, 1), torch.stack(alphas, 1)

    def forward(self, features: Tensor, captions: Tensor) -> Tensor:
        """Teacher forcing, as CaptionModel.forward: logits [B, T-1, vocab]; position t predicts captions[:, t+1]."""
        return self.head(self.drop(self._run(features, captions)[0]))

    def loss(self, features: Tensor, captions: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Mean cross-entropy over the non-<pad> targets plus the doubly stochastic regularisation."""
        targets = captions[:, 1:]
        mask = targets != SPECIAL.pad
        hidden, alphas = self._run(features, captions)
        logits = self.head(self.drop(hidden[mask]))
        xe = F.cross_entropy(logits.float(), targets[mask], label_smoothing=label_smoothing)
        coverage = (alphas.float() * mask.unsqueeze(2)).sum(1)  # [B, L]: how much each position was looked at
        return xe + ATTENTION_REG * ((1 - coverage) ** 2).mean()

    def init_state(self, features: Tensor) -> State:
        """features [B, L, D] -> the state before <start> (batch in dimension 1 of every tensor)."""
        a, keys, h, c = self._start(features)
        return h.unsqueeze(0), c.unsqueeze(0), a.transpose(0, 1), keys.transpose(0, 1)

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Read one token per sequence: tokens [B] -> logits [B, vocab] for the next token, and the new state."""
        h, c, a, keys = state
        _, h1, c1 = self._advance(tokens, a.transpose(0, 1), keys.transpose(0, 1), h[0], c[0])
        return self.head(self.drop(h1)), (h1.unsqueeze(0), c1.unsqueeze(0), a, keys)

    @torch.inference_mode()
    def attention_maps(self, features: Tensor, captions: list[list[int]],
                       special: SpecialTokens = SPECIAL) -> list[Tensor]:
        """For each image's caption (word ids, no <start>/<end>), the attention each word was chosen with:
        [words, grid, grid] per image, each map summing to 1 (the same numbers as during decoding)."""
        n = max((len(t) for t in captions), default=0)
        if not captions or n == 0:
            return [torch.zeros(0, self.config.grid, self.config.grid) for _ in captions]
        padded = torch.full((len(captions), n + 1), special.pad, dtype=torch.long, device=features.device)
        padded[:, 0] = special.start
        for i, tokens in enumerate(captions):
            padded[i, 1:len(tokens) + 1] = torch.tensor(tokens, dtype=torch.long)
        was_training = self.training
        self.eval()
        try:
            _, alphas = self._run(features, padded)  # [B, n, L]: alphas[:, t] chose word t + 1
        finally:
            self.train(was_training)
        g = self.config.grid
        return [alphas[i, :len(tokens)].float().cpu().view(-1, g, g) for i, tokens in enumerate(captions)]
