"""cfedit.editor.fit: the default schedule by dataset size and the summary's usability warnings."""

import numpy as np

from cfedit.causal.graph_file import load_graph
from cfedit.editor.fit import NULL_EDIT_WARN, default_epochs, usability_warnings


def test_default_schedule_by_dataset_size():
    assert default_epochs("mechanism", 60000, 128, 5) == 5 and default_epochs("labeller", 60000, 128, 4) == 4
    assert default_epochs("mechanism", 2000, 128, 5) == 32 and default_epochs("labeller", 2000, 128, 4) == 19
    assert default_epochs("mechanism", 100, 128, 5) == 50  # capped


def test_warnings_for_a_blurry_mechanism_and_a_labeller_near_chance():
    g = load_graph("backdoor")
    rng = np.random.default_rng(0)
    factors = np.stack([rng.integers(0, 10, 400), rng.integers(0, 2, 400), rng.integers(0, 2, 400)], 1)
    test = type("T", (), {"factors": factors, "__len__": lambda self: len(factors)})()
    good = {"null_edit_mae": 0.02, "labeller_acc_digit": 0.98, "labeller_acc_color": 1.0,
            "labeller_acc_bar": 0.99, "recipe": {"mechanism": "cvae", "residual": False}}
    assert usability_warnings(good, g, test) == []
    bad = {**good, "null_edit_mae": 0.206, "labeller_acc_digit": 0.15}
    w = usability_warnings(bad, g, test)
    assert len(w) == 2 and f"above {NULL_EDIT_WARN}" in w[0] and "labeller accuracy on digit is 0.150" in w[1]
