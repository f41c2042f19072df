"""Step-time overhead of ``spectral_guard.instrument``: paired, interleaved, one run.

Arms (copies of one model, same init, same batches, AdamW; the arm order rotates every step so
that load changes hit all arms alike):

* ``plain`` and ``guarded`` (default GuardConfig): the headline ratio;
* ``ratio1`` (every layer checked every step), on every ``--ratio1-every``-th step;
* with ``--compile``: ``plain_compiled`` and ``guarded_compiled`` (``torch.compile`` of each).

Printed: the median over paired steps of each arm's step time over its plain reference
(compiled arms over ``plain_compiled``), the guard's own time on the training thread as a
fraction of the step, and on CUDA the host synchronizations per guarded step (counted with
``torch.cuda.set_sync_debug_mode("warn")`` over a few extra steps of each arm).

    python bench/overhead.py                            # CPU: TinyGPT 6 x 384, 60 steps
    python bench/overhead.py --quick --compile          # CPU: small, with torch.compile arms
    python bench/overhead.py --device cuda --model llama --compile   # TinyLlama-1.1B shape

``--model llama`` builds a transformers ``LlamaForCausalLM`` from a TinyLlama-1.1B-shaped config
(no download); ``--llama-layers`` shrinks the depth for a CPU run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from guard_models import byte_batches, seeded_model, synthetic_text  # noqa: E402

import spectral_guard  # noqa: E402


class _Dict(torch.nn.Module):
    """Makes a transformers model return ``{"loss": ...}`` from ``(ids, labels)``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> dict:
        return {"loss": self.inner(input_ids=ids, labels=labels).loss}


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    if args.model == "gpt":
        model = seeded_model(0, n_layers=args.layers, d=args.d, heads=args.heads, seq=args.seq)
        return model, f"TinyGPT {args.layers} layers d={args.d}"
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.llama_layers,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    return _Dict(LlamaForCausalLM(cfg)), f"Llama (TinyLlama-1.1B shape, {args.llama_layers} layers)"


def batches(args: argparse.Namespace, n: int, vocab: int):
    if args.model == "gpt":
        yield from ((x.to(args.device), y.to(args.device)) for x, y in
                    byte_batches(synthetic_text(400_000, seed=0), args.batch, args.seq, n, seed=0))
        return
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(args.device)
        yield ids, ids


def one_step(arm: dict, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> None:
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.autocast):
        loss = arm["run"](x, y)["loss"]
    loss.backward()
    arm["opt"].step()
    arm["opt"].zero_grad(set_to_none=True)


def sync(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def count_syncs(arm: dict, data: list, args: argparse.Namespace) -> float:
    """Host synchronizations per step (CUDA's sync debug mode, warnings counted)."""
    sync(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for x, y in data:
                one_step(arm, x, y, args)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sync(args)
    return sum("synchroniz" in str(w.message) for w in caught) / len(data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="gpt", choices=["gpt", "llama"])
    ap.add_argument("--steps", type=int, default=None, help="paired (timed) steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--llama-layers", type=int, default=22)
    ap.add_argument("--compile", action="store_true", help="add torch.compile arms")
    ap.add_argument("--no-ratio1", action="store_true", help="skip the ratio=1.0 arm")
    ap.add_argument("--ratio1-every", type=int, default=2)
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast (default on CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    ap.add_argument("--quick", action="store_true", help="CPU: 4 layers, d=256, seq 128")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("# --device cuda: no CUDA device here; nothing measured (skipped)")
        return
    if args.model == "llama":
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("# --model llama needs transformers; nothing measured (skipped)")
            return
    if args.quick:
        args.layers, args.d, args.heads = 4, 256, 4
    if args.seq is None:
        args.seq = 128 if args.quick else (1024 if args.model == "llama" else 256)
    if args.steps is None:
        args.steps = 30 if args.quick else 60
    args.autocast = args.autocast or args.device == "cuda"
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    base, label = build(args)
    base = base.to(args.device)
    configs: dict[str, dict | None] = {"plain": None, "guarded": {}}
    if not args.no_ratio1:
        configs["ratio1"] = {"ratio": 1.0}
    if args.compile:
        configs["plain_compiled"] = None
        configs["guarded_compiled"] = {}
    arms: dict[str, dict] = {}
    for name, cfg in configs.items():
        model = copy.deepcopy(base)
        guard = spectral_guard.instrument(model, **cfg) if cfg is not None else None
        run = torch.compile(model) if name.endswith("compiled") else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                fused=args.device == "cuda")
        arms[name] = {"run": run, "guard": guard, "opt": opt, "times": {}, "guard_s": 0.0}
    del base
    guard0 = arms["guarded"]["guard"]
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    n_params = sum(p.numel() for p in arms["plain"]["opt"].param_groups[0]["params"])
    print(f"# {label}: {n_params / 1e6:.1f}M params, {len(guard0.layer_names)} guarded "
          f"Linear layers, batch {args.batch} x "
          f"{args.seq}, autocast bf16: {args.autocast}; {device}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"# guard defaults: ratio={guard0.config.ratio}, every={guard0.config.every}, "
          f"biopsy_limit={guard0.config.biopsy_limit}, sensors={guard0.config.sensors}, "
          f"attention={guard0.config.attention}")
    vocab = 32000 if args.model == "llama" else 256
    data = list(batches(args, args.warmup + args.steps, vocab))
    t_start = time.perf_counter()
    for step, (x, y) in enumerate(data):
        names = [n for n in arms if n != "ratio1" or step % args.ratio1_every == 0]
        order = names[step % len(names):] + names[:step % len(names)]
        for name in order:
            arm = arms[name]
            g0 = arm["guard"].guard_time_s if arm["guard"] else 0.0
            sync(args)
            t0 = time.perf_counter()
            one_step(arm, x, y, args)
            sync(args)
            dt = time.perf_counter() - t0
            if step >= args.warmup:
                arm["times"][step] = dt
                arm["guard_s"] += (arm["guard"].guard_time_s - g0) if arm["guard"] else 0.0
        if step % 10 == 0:
            print(f"step {step} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr,
                  flush=True)
    print(f"# paired steps: {args.steps} after {args.warmup} warm-up steps (compiled arms: "
          f"first step includes compilation); ratio1 arm on every {args.ratio1_every}th step")
    print(f"{'arm':17s} {'reference':>15s} {'median step s':>14s} {'median ratio':>13s} "
          f"{'guard time frac':>16s}")
    ratios = {}
    for name, arm in arms.items():
        ref = arms["plain_compiled" if name.endswith("compiled") else "plain"]
        paired = [t / ref["times"][s] for s, t in arm["times"].items()]
        ratios[name] = statistics.median(paired)
        frac = arm["guard_s"] / sum(arm["times"].values())
        print(f"{name:17s} {'plain_compiled' if name.endswith('compiled') else 'plain':>15s} "
              f"{statistics.median(arm['times'].values()):14.4f} {ratios[name]:13.4f} "
              f"{frac:16.5f}")
    if args.device == "cuda":
        extra = list(batches(args, 5, vocab))
        for name in ("plain", "guarded"):
            print(f"host_syncs_per_step[{name}]={count_syncs(arms[name], extra, args):.1f}")
    t = guard0.stats()["totals"]
    print(f"# guarded arm: {t['checks']} checks, {t['interventions']} interventions, "
          f"{t['treated_layers']} treated layers at the end")
    if "ratio1" in ratios:
        print(f"ratio1_ratio={ratios['ratio1']:.4f}")
    if "guarded_compiled" in ratios:
        print(f"compiled_ratio={ratios['guarded_compiled']:.4f}")
    print(f"overhead_ratio={ratios['guarded']:.4f}")


if __name__ == "__main__":
    main()
