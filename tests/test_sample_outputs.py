"""What sample.py writes: an .npz named as asked, and a PNG grid that shows every class asked for."""

from __future__ import annotations

import numpy as np
from conftest import compose_config

from ldm.checks.sampling import sampling_problems
from ldm.commands.sample import grid_order


def test_the_grid_shows_every_class_one_column_each():
    labels = np.arange(500) * 10 // 500  # sample.py's default: spread evenly, in order of class
    shown = grid_order(labels, per_row=10)
    assert len(shown) == 100
    grid = labels[shown].reshape(10, 10)  # rows x columns, as make_grid lays them out
    assert (grid == np.arange(10)).all()


def test_the_grid_of_unconditional_or_text_samples_is_the_first_ones():
    assert grid_order(np.full(500, -1), per_row=10) == list(range(100))
    assert grid_order(np.full(7, -1), per_row=10) == list(range(7))


def test_an_output_that_is_not_npz_is_refused_before_sampling(trained_run, tmp_path):
    cfg = compose_config([f"run={trained_run}", f"out={tmp_path}/x.txt"], name="sample")
    assert sampling_problems(cfg) == [f"out={tmp_path}/x.txt: sample.py writes an .npz archive (and a .png grid "
                                      f"beside it); give a name ending in .npz, e.g. out={tmp_path}/x.npz"]
