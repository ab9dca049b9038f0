"""docs/rosenbrock.py, MicroAdam's Figure 1: Top-K Adam leaves Adam's path on Rosenbrock, error
feedback brings it back."""

import importlib.util

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("rosenbrock", REPO / "docs" / "rosenbrock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def paths(demo):
    return {name: demo.run(name) for name in demo.METHODS}


def test_error_feedback_recovers_adams_minimum(demo, paths):
    final = demo.final_distances(paths)
    assert final["adam"] < 0.005
    assert final["topk_ef"] < 0.03
    assert final["topk"] > 3 * final["topk_ef"]


@pytest.mark.parametrize("lr", [0.015, 0.02, 0.025, 0.03])
def test_topk_leaves_adams_path_and_error_feedback_stays_on_it(demo, lr):
    paths = {name: demo.run(name, lr=lr) for name in demo.METHODS}
    far = {name: float(d.max()) for name, d in demo.deviation_from_adam(paths).items()}
    assert far["topk"] > 0.2
    assert far["topk_ef"] < 0.05


def test_plot_is_a_png(demo, paths, tmp_path):
    out = demo.plot(paths, tmp_path / "r.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_method_is_refused(demo):
    with pytest.raises(ValueError, match="use one of"):
        demo.run("sgd")
