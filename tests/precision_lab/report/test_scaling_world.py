"""The scaling explorer's world-size slider: one rank's state under FSDP2, 1 to 1024 ranks."""

from __future__ import annotations

import numpy as np
import torch

from precision_lab.memory import model_shape, state_bytes, widened_model
from precision_lab.report.scaling import WIDTH_MULTIPLIERS, WORLD_SIZES, scaling_section
from precision_lab.report.write import load_report_data
from precision_lab.specs import parse_spec
from tests.precision_lab.synthetic_runs import make_run_dir


def test_world_slider_redraws_the_formulas_per_rank(tmp_path):
    data = load_report_data([make_run_dir(tmp_path / "run")])
    fig = scaling_section(data).figure
    slider = fig.layout.sliders[1]
    assert [step.label for step in slider.steps] == [str(w) for w in WORLD_SIZES]
    assert WORLD_SIZES[0] == 1 and WORLD_SIZES[-1] == 1024
    one, many = slider.steps[0].args, slider.steps[-1].args
    indices = one[1]
    assert indices and indices == many[1]
    for index, y1, y1024 in zip(indices, one[0]["y"], many[0]["y"], strict=True):
        trace = fig.data[index]
        assert np.allclose(np.asarray(y1), np.asarray(trace.y))  # one rank: the drawn line
        assert (np.asarray(y1024) < np.asarray(y1)).all()  # sharded: less per rank
    # One point against the planner: the first formula line is the first spec on the
    # first model (sorted) with float32 state; its widest model on 1024 ranks.
    spec = fig.data[indices[0]].name.removesuffix(" (formula)")
    model = sorted(set(data.summary["model"].astype(str)))[0]
    shape = model_shape(widened_model(model, WIDTH_MULTIPLIERS[-1]))
    expected = sum(state_bytes(parse_spec(spec), shape, torch.float32, 1024, "fsdp").values())
    assert float(np.asarray(many[0]["y"][0])[-1]) == expected
