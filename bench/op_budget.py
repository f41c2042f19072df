"""Kernel-launch budget of the guard on CPU: aten ops per training step, counted with a
``TorchDispatchMode`` on the training thread.

On a GPU every aten op the training thread dispatches on a device tensor is (at least) one
kernel launch, at a few microseconds each: the count is what the guard costs a launch-bound
step. The worker thread's host work is not counted (it is not on the training thread, and it
launches nothing on the device).

Model: a 4-layer d=128 Llama-like ``LlamaForCausalLM`` built from a config (4 heads, 2 kv
heads, MLP 344, vocab 512), batch 4 x 64, AdamW (foreach). Printed per arm: mean aten ops per
step of the forward + backward, of ``optimizer.step()`` (guard hooks included), what the
guard adds over the plain model's step, and of those the ones that are not views (views are
metadata: no launch), over ``--steps`` steps after ``--warmup``. Arms: ``defaults``,
``ratio1`` (every layer checked every step), ``treated`` (defaults with every layer given a
collapse lambda before each step: every layer's penalty term and vector refresh).

    python bench/op_budget.py                     # defaults, ratio=1, every layer treated
    python bench/op_budget.py --stack             # the GPU path (same-shape layers stacked)
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import spectral_guard

METADATA = frozenset({"view", "_unsafe_view", "permute", "unsqueeze", "squeeze", "expand",
                      "transpose", "t", "detach", "alias", "select", "slice", "unbind",
                      "as_strided", "split", "chunk", "reshape", "_reshape_alias", "lift_fresh"})
"""Ops that only make a new view of a tensor: no kernel launch on a GPU."""


class OpCount(TorchDispatchMode):
    """Counts aten ops (overload packets) dispatched on this thread while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """Ops that are not views (each at least one kernel launch on a GPU)."""
        return sum(n for op, n in self.ops.items() if op not in METADATA)


def build(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                      max_position_embeddings=128)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def treat_every_layer(guard) -> None:
    """Give every penalized layer a collapse lambda (as a long collapse would): every step
    then builds every layer's term and refreshes its vectors."""
    for name in guard.layer_names:
        layers = guard.by_name if hasattr(guard, "by_name") else guard._by_name  # before/after
        layers[name].state.lambdas["collapse"] = 0.01


def measure(arm: str, steps: int, warmup: int) -> dict[str, float]:
    model = build()
    guard = None
    if arm != "plain":
        kw = {"ratio": 1.0} if arm == "ratio1" else {}
        guard = spectral_guard.instrument(model, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    fb = st = kfb = kst = 0
    for step in range(warmup + steps):
        if guard is not None and arm == "treated":
            treat_every_layer(guard)
        ids = torch.randint(0, 512, (4, 64), generator=g)
        with OpCount() as c1:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        with OpCount() as c2:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            fb, kfb = fb + c1.total, kfb + c1.kernels
            st, kst = st + c2.total, kst + c2.kernels
    if guard is not None:
        guard.remove()
    return {"forward_backward": fb / steps, "optimizer_step": st / steps,
            "kernels": (kfb + kst) / steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--arms", default="plain,defaults,ratio1,treated")
    ap.add_argument("--stack", action="store_true",
                    help="stack same-shape layers on the CPU too, as the guard does on a GPU")
    args = ap.parse_args()
    if args.stack:
        from spectral_guard.guard import worker

        worker.STACK_ON = worker.STACK_ON | {"cpu"}
    torch.set_num_threads(1)
    rows = {arm: measure(arm, args.steps, args.warmup) for arm in args.arms.split(",")}
    plain = rows.get("plain")
    print(f"{'arm':10s} {'fwd+bwd':>9s} {'opt.step':>9s} {'guard adds':>11s} "
          f"{'of which kernels':>17s}")
    for arm, r in rows.items():
        total = r["forward_backward"] + r["optimizer_step"]
        added = kernels = ""
        if plain is not None and arm != "plain":
            added = f"{total - plain['forward_backward'] - plain['optimizer_step']:11.1f}"
            kernels = f"{r['kernels'] - plain['kernels']:17.1f}"
        print(f"{arm:10s} {r['forward_backward']:9.1f} {r['optimizer_step']:9.1f} {added:>11s} "
              f"{kernels:>17s}")


if __name__ == "__main__":
    main()
