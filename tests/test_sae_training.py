"""Training SAEs on a real store (tiny GPT-2 over the bundled sample), resuming exactly, evaluating."""
from __future__ import annotations

import math
import re

import pytest
import torch

import mistudio as ms
from mistudio.errors import InputError, JobCancelled
from mistudio.analysis.sae_training import CHECKPOINT_DIR, CHECKPOINT_FILE, TrainConfig, evaluate_sae, train_sae
from mistudio.saes import SAE, load_sae

HP = "layers.1.residual"
TIMING = ("tokens_per_s", "eta_s", "elapsed_s")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(gpt2_dir, tmp_path_factory):
    return ms.extract(gpt2_dir, "sample", layers=[1], hooks=["residual", "mlp"], max_samples=200, batch_size=32,
                      dtype="float32", workspace=str(tmp_path_factory.mktemp("ws")))


def small(architecture: str, steps: int, **kw) -> TrainConfig:
    sparsity = {"topk": {"k": 4}, "standard": {"l1_coefficient": 2.0}, "jumprelu": {"l0_coefficient": 1.0}}
    return TrainConfig(**{"architecture": architecture, "d_sae": 64, "batch_size": 256, "n_tokens": 256 * steps,
                          "lr": 3e-3, "progress_every_steps": 10, **sparsity[architecture], **kw})


@pytest.mark.parametrize("architecture", ["topk", "standard", "jumprelu"])
def test_architectures_learn(store, tmp_path, architecture):
    seen = []
    result = train_sae(store, HP, small(architecture, 300), tmp_path, progress=seen.append)
    assert result.steps == 300 and result.tokens == 300 * 256 and result.resumed_from_step is None
    assert seen == result.history and len(seen) == 30
    first, last = result.history[0], result.history[-1]
    assert {"step", "total_steps", "tokens", "total_tokens", "epoch", "loss", "mse", "l0", "explained_variance",
            "dead_fraction", "lr", "tokens_per_s", "eta_s", "elapsed_s", "coefficient"} <= set(last)
    assert last["eta_s"] == 0 and last["epoch"] >= 3 and 0 <= last["dead_fraction"] <= 1
    assert last["explained_variance"] > first["explained_variance"] + 0.1, (first, last)
    assert last["explained_variance"] > 0.4, last
    if architecture == "topk":
        assert all(h["l0"] <= 4 for h in result.history) and last["l0"] > 3.5
    else:  # the sparsity penalty bites: fewer latents fire than at the start, and far fewer than d_sae
        assert last["l0"] < first["l0"] and last["l0"] < 32, (first, last)
    # the saved SAE (scaling and decoder norms folded in) reconstructs raw stored activations as well as training did
    saved = load_sae(result.path)
    assert saved.fingerprint == result.sae.fingerprint
    figures = evaluate_sae(saved, store, HP)
    assert figures["explained_variance"] == pytest.approx(last["explained_variance"], abs=0.08), (figures, last)
    assert figures["l0"] == pytest.approx(last["l0"], rel=0.3)
    assert figures["mse"] == pytest.approx(last["mse"], rel=0.4)


def test_the_rate_is_taken_over_seconds_not_over_one_report(store, tmp_path):
    """tokens/s (and so the ETA) over the last RATE_WINDOW_S of training, not over the last report's few steps (a
    few ms on a small SAE, where one scheduler hiccup swung the ETA from 13 s to 11 min): in a run shorter than
    the window, every report's rate is the run's own, tokens / elapsed."""
    from mistudio.analysis.sae_training import RATE_WINDOW_S

    result = train_sae(store, HP, small("topk", 30, progress_every_steps=1), tmp_path)
    early = [h for h in result.history if h["elapsed_s"] < RATE_WINDOW_S]
    assert len(early) > 10
    for h in early:
        assert h["tokens_per_s"] * h["elapsed_s"] == pytest.approx(h["tokens"], rel=1e-6), h


def test_a_short_last_step_is_scored_with_the_step_before(store, tmp_path):
    """n_tokens is exact, so the last step may hold a few rows: its figures (the run's final ones, saved in cfg.json
    and shown beside the run) count the full step before it too, not one row whose variance is 0 (EV -4e31)."""
    config = small("standard", 20, n_tokens=256 * 20 + 1, progress_every_steps=1)
    result = train_sae(store, HP, config, tmp_path)
    before, last = result.history[-2], result.history[-1]
    assert last["step"] == 21 and last["tokens"] == 256 * 20 + 1
    assert abs(last["explained_variance"] - before["explained_variance"]) < 0.05, (before, last)
    assert last["l0"] == pytest.approx(before["l0"], rel=0.1) and last["mse"] == pytest.approx(before["mse"], rel=0.1)
    assert result.sae.metadata["l0"] == last["l0"] and result.metrics == last
    alone = train_sae(store, HP, small("standard", 1, n_tokens=1), tmp_path / "one")  # one row: no variance
    assert alone.history[-1]["explained_variance"] is None and alone.history[-1]["l0"] >= 0


def test_dead_latents_are_counted_in_a_short_run_and_auxk_revives_them(store, tmp_path):
    """The dead window defaults to a quarter of the run (at most 1,000,000 tokens): a short run counts its dead
    latents (not 0 because the window is longer than the run), AuxK works on them, and cfg.json says how many.
    Before the window has passed no latent can be dead: the figure is None, not a 0 that reads as "none are"."""
    from mistudio.analysis.sae_training import plan_training

    config = small("topk", 100, d_sae=512, k=2)
    plan = plan_training(store, HP, config)
    assert plan.dead_window == 100 * 256 // 4
    result = train_sae(store, HP, config, tmp_path)
    early = [h for h in result.history if h["tokens"] <= plan.dead_window]
    late = [h for h in result.history if h["tokens"] > plan.dead_window]
    assert early and all(h["dead_fraction"] is None for h in early)
    assert late and all(h["dead_fraction"] is not None for h in late)
    last = result.history[-1]
    assert 0.05 < last["dead_fraction"] < 1, last  # 512 latents, 2 a token: many never fire
    assert any(h["sparsity_loss"] > 0 for h in late) and all(h["sparsity_loss"] == 0 for h in early)  # AuxK
    assert result.sae.metadata["num_dead_features"] == round(last["dead_fraction"] * 512)
    long_window = train_sae(store, HP, small("topk", 20, d_sae=512, k=2, dead_window_tokens=10**6), tmp_path / "b")
    assert long_window.history[-1]["dead_fraction"] is None  # the run never reached its window: not known
    assert "num_dead_features" not in long_window.sae.metadata


@pytest.mark.parametrize("architecture", ["topk", "standard", "jumprelu"])
def test_exact_resume(store, tmp_path, architecture):
    """N steps in one go == N/2, cancel, resume: the same weights, bit for bit (through an epoch boundary,
    the warm-ups, the decay and periodic checkpoints)."""
    config = small(architecture, 90, lr_warm_up_steps=5, lr_decay_steps=20, l1_warm_up_steps=8, l0_warm_up_steps=8,
                   checkpoint_every_steps=7, dead_window_tokens=2048)
    whole = train_sae(store, HP, config, tmp_path / "whole")
    calls = []

    def cancel_at_45():
        calls.append(1)
        if len(calls) == 46:
            raise JobCancelled("cancelled by the test")

    with pytest.raises(JobCancelled):
        train_sae(store, HP, config, tmp_path / "halves", check=cancel_at_45)
    state = torch.load(tmp_path / "halves" / CHECKPOINT_DIR / CHECKPOINT_FILE, weights_only=False)
    assert state["step"] == 45 and not state["finished"]
    resumed = train_sae(store, HP, config, tmp_path / "halves")
    assert resumed.resumed_from_step == 45 and resumed.steps == 90
    for name, p in whole.sae.named_parameters():
        assert torch.equal(p, dict(resumed.sae.named_parameters())[name]), name
    assert (tmp_path / "whole" / "sae" / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "halves" / "sae" / "sae_weights.safetensors").read_bytes()
    strip = lambda h: [{k: v for k, v in x.items() if k not in TIMING} for x in h]  # noqa: E731
    assert strip(whole.history) == strip(resumed.history)


def test_cancel_leaves_checkpoint_and_finished_run_returns(store, tmp_path):
    config = small("topk", 30, checkpoint_every_steps=0)
    calls = []

    def cancel_at_12():
        calls.append(1)
        if len(calls) > 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sae(store, HP, config, tmp_path, check=cancel_at_12)
    assert torch.load(tmp_path / CHECKPOINT_DIR / CHECKPOINT_FILE, weights_only=False)["step"] == 12
    assert not (tmp_path / "sae").exists()
    done = train_sae(store, HP, config, tmp_path)
    assert done.resumed_from_step == 12 and done.steps == 30

    def never():
        raise AssertionError("a finished run does not train again")

    again = train_sae(store, HP, config, tmp_path, check=never, progress=lambda f: never())
    assert again.sae.fingerprint == done.sae.fingerprint and again.steps == 30 and again.history == done.history


def test_saved_sae_loads_in_sae_lens(store, tmp_path):
    sl = pytest.importorskip("sae_lens")
    x = torch.from_numpy(store.activations(HP)[:512])
    for architecture in ("topk", "standard", "jumprelu"):
        result = train_sae(store, HP, small(architecture, 20), tmp_path / architecture)
        theirs = sl.SAE.load_from_disk(str(result.path))
        assert theirs.cfg.architecture() == architecture
        assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
        assert theirs.cfg.metadata.hook_point == HP
        assert theirs.cfg.metadata.model_name == store.record.model.name_or_path
        assert theirs.cfg.normalize_activations == "none"  # the scaling factor is folded in
        ours = result.sae.encode(x)
        assert (ours > 0).any()
        torch.testing.assert_close(theirs.encode(x), ours, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs(x), result.sae(x), rtol=1e-5, atol=1e-6)


def test_mlp_hook_point_name(store, tmp_path):
    result = train_sae(store, "layers.1.mlp", small("topk", 5, expansion_factor=None), tmp_path)
    assert (result.sae.hook_name, result.sae.hook_point) == ("blocks.1.hook_mlp_out", "layers.1.mlp")


@pytest.mark.parametrize("kwargs,field", [
    ({"architecture": "gated"}, "architecture"),
    ({"k": 0}, "k"),
    ({"batch_size": True}, "batch_size"),
    ({"lr": -1.0}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"adam_beta1": 1.0}, "adam_beta1"),
    ({"l1_coefficient": -0.5}, "l1_coefficient"),
    ({"epochs": 0}, "epochs"),
    ({"lr_warm_up_steps": -1}, "lr_warm_up_steps"),
    ({"seed": 1.5}, "seed"),
    ({"decoder_init_norm": 0}, "decoder_init_norm"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations"),
    ({"b_dec_init": "median"}, "b_dec_init"),
    ({"exclude_special": "yes"}, "exclude_special"),
    ({"device": "tpu"}, "device"),
    ({"d_sae": 0}, "d_sae"),
    ({"n_tokens": 10, "epochs": 1.0}, "n_tokens=10 or epochs=1.0"),
    ({"d_sae": 64, "expansion_factor": 2}, "d_sae=64 or expansion_factor=2"),
])
def test_bad_configs(kwargs, field):
    with pytest.raises(InputError, match=f"TrainConfig[.:].*{re.escape(field)}"):
        TrainConfig(**kwargs)


def test_a_device_is_checked_as_an_extraction_checks_it():
    """The devices TrainConfig takes are the Request's, with the same words (not torch's 20 device types)."""
    with pytest.raises(InputError) as caught:
        TrainConfig(device="gpu")
    assert str(caught.value) == ("TrainConfig.device='gpu' is not one of ('auto', 'cpu', 'cuda', 'mps') (optionally "
                                 "'cuda:N'): pass device='auto'")
    with pytest.raises(InputError, match=re.escape("device='cuda:x' is not one of")):
        TrainConfig(device="cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match=re.escape("device='cuda' cannot be used here (CUDA is not available")):
            TrainConfig(device="cuda")


@pytest.mark.parametrize("kwargs, said", [
    ({"foo": 1}, "foo is not a training setting: the settings are TrainConfig's fields (architecture, d_sae"),
    ({"learning_rate": 1e-3}, "learning_rate is not a training setting: did you mean lr?"),
    ({"expansion_factr": 4}, "did you mean expansion_factor?"),
])
def test_a_name_that_is_no_setting_is_named_with_the_one_meant(kwargs, said):
    with pytest.raises(InputError, match=re.escape(said)) as caught:  # not Python's TypeError
        TrainConfig(**kwargs)
    assert caught.value.param == next(iter(kwargs))


def test_relu_alias():
    assert TrainConfig(architecture="relu").architecture == "standard"


def test_train_time_errors(store, tmp_path):
    with pytest.raises(InputError, match="k=100 is larger than d_sae=64"):
        train_sae(store, HP, TrainConfig(d_sae=64, k=100), tmp_path / "a")
    with pytest.raises(InputError, match="batch_size=100000 is more than the"):
        train_sae(store, HP, TrainConfig(d_sae=64, k=4, batch_size=100_000), tmp_path / "b")
    with pytest.raises(InputError, match="'layers.2.residual' is not in extraction"):
        train_sae(store, "layers.2.residual", small("topk", 5), tmp_path / "c")
    with pytest.raises(InputError, match="must be a TrainConfig"):
        train_sae(store, HP, {"architecture": "topk"}, tmp_path / "d")
    with pytest.raises(InputError, match=r"epochs=1e-06 of the [\d,]+ rows .* is less than one token: pass epochs="):
        train_sae(store, HP, TrainConfig(d_sae=64, k=4, batch_size=64, epochs=1e-6), tmp_path / "f")
    assert not (tmp_path / "f").exists()  # refused before anything was made
    train_sae(store, HP, small("topk", 3), tmp_path / "e")
    with pytest.raises(InputError, match=r"other settings \(k=4 then, 8 now\).*another out_dir"):
        train_sae(store, HP, small("topk", 3, k=8), tmp_path / "e")
    with pytest.raises(InputError, match=r"other settings \(hook_point='layers.1.residual' then, 'layers.1.mlp' now"):
        train_sae(store, "layers.1.mlp", small("topk", 3), tmp_path / "e")
    # settings that do not change what is computed may differ
    train_sae(store, HP, small("topk", 3, progress_every_steps=1, checkpoint_every_steps=2), tmp_path / "e")


# -- evaluation ---------------------------------------------------------------------------------------
def identity_sae(d: int, hook_point: str) -> SAE:
    """decode(encode(x)) == x exactly: W_enc = [I, -I], W_dec = [I; -I], ReLU, zero biases."""
    sae = SAE("standard", d, 2 * d, hook_point=hook_point)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


@pytest.fixture(scope="module")
def trained_lm(store, gpt2_dir):
    """The tiny GPT-2 trained a little on the stored tokens, so it beats uniform guessing and zeroing a hook point
    hurts it (the random model predicts about uniformly: zeroing its last layers helps it)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(lm.parameters(), lr=1e-2)
    ids = [torch.as_tensor(store.sample(i, hook_points=[], tokens=False)["input_ids"][:64], dtype=torch.int64)
           for i in range(32)]
    for step in range(40):
        batch = ids[step % 32][None]
        lm(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return lm.eval()


@pytest.mark.parametrize("hook_point", ["layers.1.residual", "layers.1.mlp"])
def test_evaluate_identity_sae(store, trained_lm, hook_point):
    sae = identity_sae(32, hook_point)
    figures = evaluate_sae(sae, store, hook_point, model=trained_lm, n_samples=4)
    assert figures["explained_variance"] == 1.0 and figures["mse"] == 0.0
    assert figures["n_tokens"] > 10_000 and figures["dead_fraction"] == 0.0
    assert 16 <= figures["l0"] <= 32  # x_j != 0 fires exactly one of the pair
    assert figures["ce_spliced"] == pytest.approx(figures["ce_clean"], abs=1e-6)
    assert figures["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert figures["ce_zero_ablation"] > figures["ce_clean"] + 1e-3  # zeroing hurts the trained model
    assert figures["ce_loss_score"] == pytest.approx(1.0, abs=1e-5) and "ce_loss_note" not in figures
    assert figures["ce_samples"] == 4 and figures["ce_tokens"] > 100


def test_loss_recovered_is_undefined_where_zeroing_does_not_hurt(store, gpt2_dir):
    """The random model predicts about uniformly and zeroing its last layer's output makes its logits exactly
    uniform: the loss falls. (zero - spliced) / (zero - clean) would print a number that means nothing."""
    figures = evaluate_sae(identity_sae(32, HP), store, HP, model=gpt2_dir, n_samples=4)
    assert figures["ce_zero_ablation"] < figures["ce_clean"]
    assert figures["ce_loss_score"] is None
    assert figures["ce_loss_note"].startswith("zeroing the hook point does not raise the loss here, or by less")


def test_loss_recovered_needs_a_real_rise_from_zero_ablation():
    """An untrained model whose loss rose 0.0005 nats when the hook point was zeroed printed 1,016% "recovered":
    a rise under 0.1% of the loss gives no score, with the note; a real rise gives the ratio, below 0 or above 1
    included (an SAE worse than zeroing is worth knowing)."""
    from mistudio.analysis.sae_training import loss_recovered

    untrained = loss_recovered(clean=5.99093, spliced=5.98600, zero=5.99146)
    assert untrained["ce_loss_score"] is None and "by less than 0.1%" in untrained["ce_loss_note"]
    assert loss_recovered(3.0, 3.5, 4.0) == {"ce_loss_score": 0.5}
    assert loss_recovered(3.0, 4.5, 4.0)["ce_loss_score"] == pytest.approx(-0.5)
    assert loss_recovered(3.0, 3.0, 2.9)["ce_loss_score"] is None  # zeroing lowers the loss


def test_evaluate_splices_the_hook_point(store, trained_lm):
    """An SAE that reconstructs zeros splices zero-ablation in: the hook really replaces the output."""
    zeros = SAE("standard", 32, 64, hook_point=HP)
    figures = evaluate_sae(zeros, store, HP, max_tokens=2000, model=trained_lm, n_samples=2)
    assert figures["ce_spliced"] == pytest.approx(figures["ce_zero_ablation"], abs=1e-6)
    assert abs(figures["ce_spliced"] - figures["ce_clean"]) > 1e-3
    assert figures["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert figures["explained_variance"] < 0.05 and figures["dead_fraction"] == 1.0 and figures["l0"] == 0
    assert figures["n_tokens"] <= 2000


def test_evaluate_with_loaded_model(store, gpt2_dir):
    loaded = ms.load_model(ms.ModelSpec(name_or_path=gpt2_dir, device="cpu"))
    a = evaluate_sae(identity_sae(32, HP), store, HP, max_tokens=500, model=loaded, n_samples=2)
    b = evaluate_sae(identity_sae(32, HP), store, HP, max_tokens=500, model=gpt2_dir, n_samples=2)
    assert a["ce_clean"] == pytest.approx(b["ce_clean"], rel=1e-6) and math.isfinite(a["ce_clean"])


def test_evaluate_errors(store, tiny_models):
    with pytest.raises(InputError, match="width 16, but layers.1.residual has width 32"):
        evaluate_sae(SAE("standard", 16, 32), store, HP)
    with pytest.raises(InputError, match="trained on blocks.0.hook_resid_post"):
        evaluate_sae(SAE("standard", 32, 64, hook_name="blocks.0.hook_resid_post"), store, HP)
    with pytest.raises(InputError, match="max_tokens=0"):
        evaluate_sae(identity_sae(32, HP), store, HP, max_tokens=0)
    with pytest.raises(InputError, match="bert encoder: the spliced cross-entropy needs a decoder"):
        evaluate_sae(identity_sae(32, HP), store, HP, max_tokens=100, model=tiny_models["bert"])
    with pytest.raises(InputError, match="cannot be loaded"):
        evaluate_sae(identity_sae(32, HP), store, HP, max_tokens=100, model=str(tiny_models["bert"]) + "-missing")


def test_n_tokens_trains_that_many_tokens_not_whole_batches(store, tmp_path):
    """n_tokens=1000 with batches of 256 is three full steps and one of 232 rows: 1,000 tokens, as asked, and the
    figures count to it (they said 1,024 before)."""
    seen = []
    result = train_sae(store, HP, small("topk", 1, n_tokens=1000, progress_every_steps=1), tmp_path,
                       progress=seen.append)
    assert result.steps == 4 and result.tokens == 1000
    assert [h["tokens"] for h in seen] == [256, 512, 768, 1000]
    assert {h["total_tokens"] for h in seen} == {1000} and seen[-1]["eta_s"] == 0
