"""TensorBoard: ``guard.log_to(writer, step)`` written with a real SummaryWriter and read back
with TensorBoard's own event reader."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
from test_integration_extras import always_firing, doc_example, require
from torch.utils.data import DataLoader, TensorDataset

require("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

import spectral_guard  # noqa: E402
from spectral_guard.integrations.tensorboard import LAYER_SCALARS, log_guard  # noqa: E402

KEYS = ("interventions", "treated_layers", "min_effective_rank_retention",
        "mean_stable_rank_ratio", "nonfinite_layers", "penalty")


def events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def trained(steps: int, writer=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(),
                          nn.Linear(48, 4))
    guard = spectral_guard.instrument(model, ratio=1.0, thresholds=always_firing())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        (nn.functional.cross_entropy(model(x), y) + guard.penalty()).backward()
        opt.step()
        opt.zero_grad()
        if writer is not None:
            guard.log_to(writer, guard.global_step)
    return guard


def test_log_to_writes_metrics_layer_scalars_and_histogram(tmp_path, single_thread):
    with SummaryWriter(str(tmp_path)) as writer:
        guard = trained(4, writer)
    acc = events(tmp_path)
    tags = acc.Tags()
    metrics = guard.metrics()
    for key in KEYS:
        series = acc.Scalars(f"spectral_guard/{key}")
        assert [e.step for e in series] == [1, 2, 3, 4], key
        if math.isfinite(metrics[key]):
            assert series[-1].value == metrics[key] or math.isclose(series[-1].value,
                                                                     metrics[key], rel_tol=1e-6)
    stats = guard.stats()["layers"]
    for name in guard.layer_names:
        for key in LAYER_SCALARS:
            tag = f"spectral_guard/layers/{name}/{key}"
            assert tag in tags["scalars"], tag
            assert math.isclose(acc.Scalars(tag)[-1].value, stats[name]["sensors"][key],
                                rel_tol=1e-6)
        assert acc.Scalars(f"spectral_guard/layers/{name}/lambda")[-1].value > 0  # treated
    hist = acc.Histograms("spectral_guard/effective_rank_retention")
    assert [h.step for h in hist] == [1, 2, 3, 4]
    last = hist[-1].histogram_value
    retention = [stats[n]["sensors"]["effective_rank_retention"] for n in guard.layer_names]
    assert last.num == len(retention)
    assert math.isclose(last.min, min(retention), rel_tol=1e-6)
    assert math.isclose(last.max, max(retention), rel_tol=1e-6)


def test_log_to_a_directory_opens_and_closes_a_writer(tmp_path, single_thread):
    guard = trained(2)
    log_guard(guard, tmp_path / "run", step=7)
    acc = events(tmp_path / "run")
    assert [e.step for e in acc.Scalars("spectral_guard/interventions")] == [7]


def test_docs_tensorboard_example_runs_as_written(tmp_path, monkeypatch, single_thread):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 16, generator=g), torch.randint(0, 4, (16,), generator=g))
    namespace = {"train_loader": DataLoader(data, batch_size=4)}
    exec(compile(doc_example("tensorboard"), "docs/integrations.md", "exec"), namespace)
    acc = events(tmp_path / "runs" / "guarded")
    assert [e.step for e in acc.Scalars("spectral_guard/penalty")] == [1, 3]
