"""TensorBoard: ``guard.log_to(writer, step)`` written with a real SummaryWriter and read back
with TensorBoard's own event reader."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from test_integration_extras import doc_example, require, trained_guard
from torch.utils.data import DataLoader, TensorDataset

require("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from spectral_guard.integrations.tensorboard import LAYER_SCALARS, log_guard  # noqa: E402

KEYS = ("interventions", "treated_layers", "min_effective_rank_retention",
        "mean_stable_rank_ratio", "nonfinite_layers", "penalty")


def events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_log_to_writes_metrics_layer_scalars_and_histogram(tmp_path, single_thread):
    with SummaryWriter(str(tmp_path)) as writer:
        guard = trained_guard(4, lambda g: g.log_to(writer, g.global_step))
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
    guard = trained_guard(2)
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
