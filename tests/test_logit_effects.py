"""Logit effects equal a numpy computation from the weights in each model's safetensors file."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from mistudio.errors import InputError
from mistudio.analysis.logit_effects import Unembedding, logit_effects, logit_effects_many, neuron_logit_effects
from mistudio.models import load_model
from mistudio.specs import ModelSpec

from conftest import _configs

# family -> (final norm weight key, unembedding key, gain convention) in an AutoModelForCausalLM checkpoint
CAUSAL_KEYS = {
    "gpt2": ("transformer.ln_f.weight", "transformer.wte.weight", "weight"),  # tied: the head is the embedding
    "gpt_neox": ("gpt_neox.final_layer_norm.weight", "embed_out.weight", "weight"),
    "llama": ("model.norm.weight", "lm_head.weight", "weight"),
    "qwen2": ("model.norm.weight", "lm_head.weight", "weight"),
    "gemma": ("model.norm.weight", "model.embed_tokens.weight", "1 + weight"),  # tied, GemmaRMSNorm adds one
    "phi": ("model.final_layernorm.weight", "lm_head.weight", "weight"),
}
# the conftest models are saved as base models (AutoModel): only the tied ones have an unembedding
BASE_KEYS = {"gpt2": ("ln_f.weight", "wte.weight", "weight"),
             "gemma": ("norm.weight", "embed_tokens.weight", "1 + weight")}


@pytest.fixture(scope="module")
def causal_models(tmp_path_factory, tokenizer_dir):
    """{family: folder} of tiny causal LMs (with their heads) whose final norms have random scales and biases."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    configs = _configs(vocab)
    folders = {}
    for family in CAUSAL_KEYS:
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(configs[family])
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name or "ln_f" in name:  # random gains (and biases) so a wrong convention shows
                    param.copy_(torch.randn_like(param) * 0.5 + (0.0 if family == "gemma" else 1.0))
        folder = tmp_path_factory.mktemp(f"causal_{family}")
        model.save_pretrained(folder)
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, folder / f.name)
        folders[family] = str(folder)
    return folders


def expected_logits(folder: str, keys: tuple[str, str, str], directions: np.ndarray, vocab: int) -> np.ndarray:
    weights = load_file(str(Path(folder) / "model.safetensors"))
    norm_key, unembed_key, convention = keys
    gain = weights[norm_key].astype(np.float64)
    if convention == "1 + weight":
        gain = 1.0 + gain
    W_U = weights[unembed_key].astype(np.float64)[:vocab].T  # (d, vocab)
    return directions.astype(np.float64) @ (gain[:, None] * W_U)


def check_against(effects: list[dict], logits: np.ndarray, k: int) -> None:
    for row, effect in zip(logits, effects):
        top, bottom = np.argsort(-row)[:k], np.argsort(row)[:k]
        assert [e["token_id"] for e in effect["promoted"]] == top.tolist()
        assert [e["token_id"] for e in effect["suppressed"]] == bottom.tolist()
        np.testing.assert_allclose([e["value"] for e in effect["promoted"]], row[top], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([e["value"] for e in effect["suppressed"]], row[bottom], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(CAUSAL_KEYS))
def test_causal_models_match_their_safetensors(causal_models, family):
    folder = causal_models[family]
    unembedding = Unembedding.from_model(folder)
    assert unembedding.convention == CAUSAL_KEYS[family][2]
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((5, unembedding.d_model)).astype(np.float32)
    logits = expected_logits(folder, CAUSAL_KEYS[family], directions, unembedding.n_tokens)
    effects = logit_effects_many(directions, unembedding, k=7)
    check_against(effects, logits, 7)
    one = logit_effects(directions[2], unembedding, k=7)
    check_against([one], logits[2:3], 7)
    assert all(e["token"] == unembedding.tokenizer.convert_ids_to_tokens(e["token_id"]) for e in one["promoted"])


@pytest.mark.parametrize("family", sorted(BASE_KEYS))
def test_conftest_models_with_tied_embeddings(tiny_models, family):
    unembedding = Unembedding.from_model(tiny_models[family])
    assert unembedding.tied
    directions = np.random.default_rng(1).standard_normal((3, unembedding.d_model))
    logits = expected_logits(tiny_models[family], BASE_KEYS[family], directions, unembedding.n_tokens)
    check_against(logit_effects_many(directions, unembedding, k=5), logits, 5)


def test_gain_is_what_the_model_computes(causal_models):
    """End to end through the real modules: for h with mean 0 and unit RMS, norm(h) = gain * h (up to eps and a
    bias), so head(norm(h)) - head(norm(-h)) is twice h's logit effect on every token."""
    from transformers import AutoModelForCausalLM

    for family, folder in causal_models.items():
        unembedding = Unembedding.from_model(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        base = model.base_model
        norm = next(m for name, m in base.named_children() if name in ("ln_f", "final_layer_norm",
                                                                          "final_layernorm", "norm"))
        h = torch.randn(1, unembedding.d_model, dtype=torch.float64)
        h = (h - h.mean()) / (h - h.mean()).pow(2).mean().sqrt()
        with torch.no_grad():
            head = model.get_output_embeddings().double()
            norm = norm.double()
            diff = (head(norm(h)) - head(norm(-h)))[0, :unembedding.n_tokens] / 2
        logits = (h.float() @ unembedding.folded)[0]
        torch.testing.assert_close(logits.double(), diff, rtol=1e-4, atol=1e-4, msg=family)


def test_center_shifts_values_not_ranks(causal_models):
    unembedding = Unembedding.from_model(causal_models["llama"])
    direction = np.random.default_rng(2).standard_normal(unembedding.d_model)
    plain, centred = logit_effects(direction, unembedding, k=4), logit_effects(direction, unembedding, k=4, center=True)
    shift = float((torch.as_tensor(direction, dtype=torch.float32) @ unembedding.folded).mean())
    assert [e["token_id"] for e in plain["promoted"]] == [e["token_id"] for e in centred["promoted"]]
    np.testing.assert_allclose([e["value"] - shift for e in plain["promoted"]],
                               [e["value"] for e in centred["promoted"]], rtol=1e-5, atol=1e-6)


def test_neurons_are_unit_directions(causal_models):
    unembedding = Unembedding.from_model(causal_models["phi"])
    effects = neuron_logit_effects([0, 5], unembedding, k=3)
    row = (unembedding.gain[5] * unembedding.W_U[5]).double().numpy()[None]  # e_5 @ diag(gain) @ W_U
    check_against(effects[1:], row, 3)
    with pytest.raises(InputError, match=r"neurons \[32\] are outside 0..31"):
        neuron_logit_effects([32], unembedding)


def test_loaded_models(gpt2_dir, tiny_models):
    from_folder = Unembedding.from_model(gpt2_dir)
    loaded = load_model(ModelSpec(name_or_path=gpt2_dir, device="cpu"))  # mistudio loads the base model
    from_loaded = Unembedding.from_model(loaded)
    torch.testing.assert_close(from_loaded.folded, from_folder.folded)
    with pytest.raises(InputError, match="without its LM head and does not tie"):
        Unembedding.from_model(load_model(ModelSpec(name_or_path=tiny_models["llama"], device="cpu")))
    with pytest.raises(InputError, match="needs the tokenizer"):
        Unembedding.from_model(loaded.model)


def test_refusals(tiny_models, causal_models, tmp_path):
    with pytest.raises(InputError, match="encoder.*no next-token unembedding"):
        Unembedding.from_model(tiny_models["bert"])
    with pytest.raises(InputError, match=r"no LM head weights \(lm_head.weight is not in its checkpoint"):
        Unembedding.from_model(tiny_models["llama"])  # saved as a base model, head not tied
    with pytest.raises(InputError, match="no config.json"):
        Unembedding.from_model(tmp_path)
    unembedding = Unembedding.from_model(causal_models["gpt2"])
    with pytest.raises(InputError, match=r"shape \(1, 16\) do not match the model's residual width 32"):
        logit_effects(np.ones(16), unembedding)
    with pytest.raises(InputError, match="k=0 is not a positive integer"):
        logit_effects(np.ones(32), unembedding, k=0)
    with pytest.raises(InputError, match="NaN"):
        logit_effects(np.full(32, np.nan), unembedding)
    with pytest.raises(InputError, match="takes one direction, got 2"):
        logit_effects(np.ones((2, 32)), unembedding)
