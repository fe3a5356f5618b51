"""A feature index is a whole number: ``feature=True`` is not feature 1 and ``feature=2.9`` not feature 2 (issue 16,
part 8). Every analysis function that takes a feature refuses them, naming the value; numpy ints are accepted."""
from __future__ import annotations

import numpy as np
import pytest

import mistudio as ms
from mistudio.analysis import plots
from mistudio.analysis.logit_effects import Unembedding, neuron_logit_effects

HP = "layers.0.residual"
BAD = [(True, r"feature=True is a boolean, not a feature index"), (np.bool_(False), r"feature=.*False.* is a boolean"),
       (2.9, r"feature=2.9 is a float, not a feature index"), (2.0, r"feature=2.0 is a float"),
       ("3", r"feature='3' is a str"), (None, r"feature=None is a NoneType"),
       (32, r"feature=32 is out of range: layers.0.residual has 32 features \(0 to 31\): pass feature=31"),
       (-1, r"feature=-1 is out of range")]


@pytest.fixture(scope="module")
def ext(gpt2_dir, tmp_path_factory):
    return ms.extract(gpt2_dir, ms.sample_texts()[:12], layers=[0], hooks=["residual"], dtype="float32",
                      max_length=32, progress=False, workspace=str(tmp_path_factory.mktemp("ws")))


@pytest.mark.parametrize("value,message", BAD)
def test_top_examples_refuses_what_is_not_a_feature_index(ext, value, message):
    with pytest.raises(ms.InputError, match=message):
        ext.top_examples(HP, value, k=3)
    with pytest.raises(ms.InputError, match=message):
        ext.top_examples(HP, [1, value], k=3)  # in a list too, and before anything is read
    with pytest.raises(ms.InputError, match=message):
        plots.feature_column(ext, HP, value)
    with pytest.raises(ms.InputError, match=message):
        plots.top_tokens(ext, HP, value)
    if value is not None:  # the heatmap's feature is optional: None outlines none
        with pytest.raises(ms.InputError, match=message):
            plots.heatmap(ext, int(ext.sample_index[0]), HP, feature=value)


def test_numpy_ints_are_feature_indices(ext):
    plain = ext.top_examples(HP, 3, k=4)
    assert ext.top_examples(HP, np.int64(3), k=4) == plain == ext.top_examples(HP, np.array(3), k=4)
    many = ext.top_examples(HP, np.array([3, 5]), k=4)
    assert many[3] == plain and set(many) == {3, 5}
    np.testing.assert_array_equal(plots.feature_column(ext, HP, np.int32(3)), plots.feature_column(ext, HP, 3))
    column = ext.activations(HP)[:ext.committed_tokens(), 1]  # feature 1 is what True used to read
    np.testing.assert_array_equal(plots.feature_column(ext, HP, 1), column)


@pytest.mark.parametrize("name,value", [("k", True), ("k", 2.5), ("k", 0), ("context", -1), ("context", 1.5)])
def test_k_and_context_are_whole_numbers(ext, name, value):
    with pytest.raises(ms.InputError, match=rf"{name}={value!r} is not valid: pass {name}=\d+ or more"):
        ext.top_examples(HP, 1, **{name: value})


def test_bins_and_neurons(ext, gpt2_dir):
    with pytest.raises(ms.InputError, match=r"bins=True is not valid"):
        ext.feature_stats(HP, bins=True)
    unembedding = Unembedding.from_model(gpt2_dir)
    for value, message in [(True, "features=True is a boolean, not a neuron index"),
                           (2.9, "features=2.9 is a float, not a neuron index")]:
        with pytest.raises(ms.InputError, match=message):
            neuron_logit_effects([value], unembedding)
    assert neuron_logit_effects([np.int64(2)], unembedding, k=2) == neuron_logit_effects([2], unembedding, k=2)
