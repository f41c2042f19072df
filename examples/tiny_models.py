"""Small models trained on CPU in seconds, and the damage the audit must find.

Used by ``examples/make_example.py`` (the bundled example checkpoint), by
``bench/calibrate_defaults.py`` (the measurements behind the default thresholds) and by the
audit tests. Everything is generated here: no downloads.

* :func:`train_mlp`: a 3-hidden-layer ReLU MLP on a teacher-network classification task.
* :func:`train_char_lm`: a pre-LN decoder-only transformer (LLaMA-style parameter names) on text
  from a random Markov "language" of made-up words.
* :func:`inject`: replace or damage one matrix (rank-1/rank-4 replacement, rank-1 spike, all
  zero, NaN/Inf entries, zeroed rows).
"""

from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# MLP on a teacher task


def train_mlp(seed: int = 0, d_in: int = 32, width: int = 256, classes: int = 10,
              steps: int = 600, batch: int = 256) -> tuple[dict[str, Tensor], float]:
    """Train ``d_in -> width -> width -> width -> classes`` with Adam; returns (state, accuracy).

    Labels are the argmax of a random 2-layer teacher network; accuracy is on fresh samples.
    """
    gen = torch.Generator().manual_seed(seed)
    t1 = torch.randn(d_in, 64, generator=gen) / math.sqrt(d_in)
    t2 = torch.randn(64, classes, generator=gen) / 8.0

    def sample(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, d_in, generator=gen)
        return x, (torch.tanh(x @ t1) @ t2).argmax(1)

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x, y = sample(batch)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        x, y = sample(4096)
        acc = float((model(x).argmax(1) == y).float().mean())
    names = {"0": "mlp.fc1", "2": "mlp.fc2", "4": "mlp.fc3", "6": "classifier"}
    state = {}
    for key, value in model.state_dict().items():
        idx, kind = key.split(".")
        state[f"{names[idx]}.{kind}"] = value.detach().clone().contiguous()
    return state, acc


# ----------------------------------------------------------------------------------------------
# Character-level transformer on a made-up Markov language


def markov_text(seed: int = 0, n_chars: int = 200_000, n_words: int = 300,
                alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> str:
    """Text from a first-order Markov chain over ``n_words`` random words (each word has 4
    likely successors), words separated by spaces and sentences by '. '."""
    gen = torch.Generator().manual_seed(seed)
    words = []
    for _ in range(n_words):
        length = int(torch.randint(2, 8, (1,), generator=gen))
        letters = torch.randint(0, len(alphabet), (length,), generator=gen)
        words.append("".join(alphabet[i] for i in letters))
    succ = torch.randint(0, n_words, (n_words, 4), generator=gen)
    out, w, size = [], 0, 0
    while size < n_chars:
        word = words[w]
        end = ". " if float(torch.rand(1, generator=gen)) < 0.1 else " "
        out.append(word + end)
        size += len(word) + len(end)
        w = int(succ[w, int(torch.randint(0, 4, (1,), generator=gen))])
    return "".join(out)[:n_chars]


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.input_layernorm = nn.LayerNorm(d)
        self.self_attn = nn.Module()
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, proj, nn.Linear(d, d, bias=False))
        self.post_attention_layernorm = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(d, ffn, bias=False)
        self.mlp.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.input_layernorm(x)
        a = self.self_attn

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = nn.functional.scaled_dot_product_attention(
            split(a.q_proj(h)), split(a.k_proj(h)), split(a.v_proj(h)), is_causal=True)
        x = x + a.o_proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(nn.functional.gelu(self.mlp.up_proj(h)))


class CharLM(nn.Module):
    """Decoder-only transformer whose state_dict uses LLaMA-style names."""

    def __init__(self, vocab: int, d: int = 128, heads: int = 4, ffn: int = 512,
                 layers: int = 2, ctx: int = 64) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.embed_positions = nn.Embedding(ctx, d)
        self.model.layers = nn.ModuleList(_Block(d, heads, ffn) for _ in range(layers))
        self.model.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1])
        x = self.model.embed_tokens(idx) + self.model.embed_positions(pos)
        for block in self.model.layers:
            x = block(x)
        return self.lm_head(self.model.norm(x))


def train_char_lm(seed: int = 0, d: int = 128, heads: int = 4, ffn: int = 512, layers: int = 2,
                  ctx: int = 64, steps: int = 300, batch: int = 32, lr: float = 3e-3,
                  n_words: int = 300) -> tuple[dict[str, Tensor], float, float]:
    """Train :class:`CharLM` on :func:`markov_text`; returns (state, held-out loss, uniform
    loss ``ln(vocab)``) so callers can check it learned (loss well below uniform)."""
    text = markov_text(seed, n_words=n_words)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CharLM(len(chars), d, heads, ffn, layers, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)

    def batch_of(src: Tensor, n: int) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, len(src) - ctx - 1, (n,), generator=gen)
        x = torch.stack([src[s:s + ctx] for s in starts.tolist()])
        y = torch.stack([src[s + 1:s + ctx + 1] for s in starts.tolist()])
        return x, y

    for _ in range(steps):
        x, y = batch_of(train, batch)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    with torch.no_grad():
        x, y = batch_of(held, 256)
        held_loss = float(nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return state, held_loss, math.log(len(chars))


# ----------------------------------------------------------------------------------------------
# Damage

INJECTIONS = ("rank1", "rank4", "spike", "zero", "nan", "inf", "dead_rows")


def inject(W: Tensor, kind: str, seed: int = 0) -> Tensor:
    """A damaged copy of ``W`` (same shape and dtype).

    ``rank1`` / ``rank4``: the best rank-1 / rank-4 approximation of ``W`` (truncated SVD),
    rescaled to ``W``'s Frobenius norm. ``spike``: ``W + 3 ||W||_F u v^T`` with random unit
    ``u, v`` (one direction holds ~90% of the energy). ``zero``: all zeros. ``nan`` / ``inf``:
    one entry set to NaN / +Inf. ``dead_rows``: 10% of the rows (at least 1) set to zero.
    """
    gen = torch.Generator().manual_seed(seed)
    Wf = W.detach().to(torch.float64)
    m, n = Wf.shape
    if kind in ("rank1", "rank4"):
        r = 1 if kind == "rank1" else 4
        if max(m, n) <= 1024:
            U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)
            low = (U[:, :r] * S[:r]) @ Vh[:r]
        else:  # big layers: randomized SVD (top-r subspace, accurate for a decaying tail)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                U, S, V = torch.svd_lowrank(Wf, q=r + 8, niter=4)
            low = (U[:, :r] * S[:r]) @ V[:, :r].T
        out = low * (Wf.norm() / low.norm())
    elif kind == "spike":
        u = torch.randn(m, 1, generator=gen, dtype=torch.float64)
        v = torch.randn(1, n, generator=gen, dtype=torch.float64)
        out = Wf + 3.0 * Wf.norm() * (u / u.norm()) @ (v / v.norm())
    elif kind == "zero":
        out = torch.zeros_like(Wf)
    elif kind in ("nan", "inf"):
        out = Wf.clone()
        i = int(torch.randint(0, m, (1,), generator=gen))
        j = int(torch.randint(0, n, (1,), generator=gen))
        out[i, j] = math.nan if kind == "nan" else math.inf
    elif kind == "dead_rows":
        out = Wf.clone()
        k = max(1, m // 10)
        out[torch.randperm(m, generator=gen)[:k]] = 0.0
    else:
        raise ValueError(f"unknown injection {kind!r}; choose from {', '.join(INJECTIONS)}")
    return out.to(W.dtype).contiguous()
