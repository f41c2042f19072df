"""Small models and generated data for the guard's tests and probes (no downloads)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "every bird", "some child",
             "the robot", "our teacher", "a small fox", "the queen"]
_VERBS = ["sees", "likes", "chases", "finds", "paints", "follows", "helps", "meets"]
_OBJECTS = ["the ball", "a red apple", "the river", "two stones", "the moon", "a green box",
            "the garden", "seven cards", "the tall tree"]
_ENDS = [".", "!", " today.", " again.", " at night.", " with care."]


def synthetic_text(n_chars: int, seed: int = 0) -> bytes:
    """Sentences from a tiny generative grammar, with counting patterns, as bytes."""
    gen = torch.Generator().manual_seed(seed)
    out: list[str] = []
    total = 0

    def pick(items: list[str]) -> str:
        return items[int(torch.randint(len(items), (1,), generator=gen))]

    while total < n_chars:
        if int(torch.randint(5, (1,), generator=gen)) == 0:
            k = int(torch.randint(2, 9, (1,), generator=gen))
            s = " ".join(str(i) for i in range(k)) + ". "
        else:
            s = f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)}{pick(_ENDS)} "
        out.append(s)
        total += len(s)
    return "".join(out).encode()[:n_chars]


def byte_batches(data: bytes, batch: int, seq: int, steps: int, seed: int = 0):
    """``steps`` batches of ``(inputs, targets)`` byte windows, seeded."""
    t = torch.tensor(list(data), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, t.numel() - seq - 1, (batch,), generator=gen)
        x = torch.stack([t[s:s + seq] for s in starts.tolist()])
        y = torch.stack([t[s + 1:s + seq + 1] for s in starts.tolist()])
        yield x, y


class Block(nn.Module):
    def __init__(self, d: int, heads: int, use_mha: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d)
        self.use_mha = use_mha
        if use_mha:
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        else:
            self.q_proj = nn.Linear(d, d)
            self.k_proj = nn.Linear(d, d)
            self.v_proj = nn.Linear(d, d)
            self.o_proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        if self.use_mha:
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
            return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        h = self.heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Byte-level decoder: ``forward(idx, targets=None) -> {"logits", "loss"}``."""

    def __init__(self, n_layers: int = 2, d: int = 64, heads: int = 4, seq: int = 64,
                 vocab: int = 256, tied: bool = False, use_mha: bool = False,
                 checkpoint: bool | str = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, use_mha) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight
        self.checkpoint = checkpoint
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02 if "proj" not in name else 0.02 / math.sqrt(2))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for block in self.blocks:
            if self.checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, use_reentrant=self.checkpoint == "reentrant")
            else:
                x = block(x)
        logits = self.lm_head(self.ln_f(x))
        out = {"logits": logits}
        if targets is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return out


def seeded_model(seed: int = 0, **kwargs) -> TinyGPT:
    """A TinyGPT built under a fork of the RNG so the caller's global RNG is untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyGPT(**kwargs)


def thresholds(**guard_fields):
    """A Thresholds whose default rule has only the given guard fields (tests force triggers
    with e.g. ``effective_rank_retention_min=2.0``: retention is always below 2)."""
    from spectral_guard.thresholds import Rule, Thresholds

    return Thresholds(Rule(**guard_fields))
