"""Loading, applying and saving SAEs: compared with the real sae_lens and sparsify packages where installed."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from mistudio.errors import InputError
from mistudio.saes import SAE, SparseLatents, check_applies, hook_point_of, load_sae, tl_hook_name

D_IN, D_SAE, K = 32, 128, 8
CLOSE = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def sl():
    return pytest.importorskip("sae_lens")


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights at scales where some latents fire and others do not (a JumpReLU threshold cuts some)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name == "threshold":
                p.copy_(noise.abs() * 0.6)
            elif name.startswith("W") or name.endswith("weight"):
                p.copy_(noise * 0.3)
            else:
                p.copy_(noise * 0.2)


def inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 1.5


def make_saelens(sl, architecture: str, hook: str = "blocks.2.hook_resid_post", seed: int = 0, **cfg):
    from sae_lens.saes.sae import SAEMetadata

    classes = {"standard": (sl.StandardSAE, sl.StandardSAEConfig), "topk": (sl.TopKSAE, sl.TopKSAEConfig),
               "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig), "gated": (sl.GatedSAE, sl.GatedSAEConfig)}
    cls, cfg_cls = classes[architecture]
    if architecture == "topk":
        cfg.setdefault("k", K)
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=SAEMetadata(hook_name=hook), **cfg))
    randomize(sae, seed)
    return sae


ARCHS = ["standard", "topk", "jumprelu", "gated"]


# -- SAELens ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ARCHS)
def test_saelens_encode_decode_equal(sl, tmp_path, architecture):
    ref = make_saelens(sl, architecture)
    ref.save_model(tmp_path)
    sae = load_sae(tmp_path)
    assert (sae.architecture, sae.d_in, sae.d_sae) == (architecture, D_IN, D_SAE)
    assert sae.k == (K if architecture == "topk" else None)
    assert (sae.hook_name, sae.hook_point, sae.source) == ("blocks.2.hook_resid_post", "layers.2.residual", "saelens")
    x = inputs()
    ours, theirs = sae.encode(x), ref.encode(x)
    fired = (theirs > 0).float().mean().item()
    assert 0.02 < fired < 0.9, fired  # a meaningful comparison: some latents fire, some do not
    torch.testing.assert_close(ours, theirs, **CLOSE)
    z = theirs * torch.rand(theirs.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sae.decode(z), ref.decode(z), **CLOSE)
    torch.testing.assert_close(sae(x), ref(x), **CLOSE)
    x3 = x.reshape(4, 16, D_IN)  # any leading shape
    torch.testing.assert_close(sae.encode(x3), ref.encode(x3), **CLOSE)


@pytest.mark.parametrize("architecture", ARCHS)
def test_save_loads_in_saelens(sl, tmp_path, architecture):
    ref = make_saelens(sl, architecture, hook="blocks.1.hook_mlp_out", seed=5)
    ref.save_model(tmp_path / "a")
    sae = load_sae(tmp_path / "a")
    sae.save(tmp_path / "b")
    again = sl.SAE.load_from_disk(str(tmp_path / "b"))
    assert type(again) is type(ref)
    assert again.cfg.metadata.hook_name == "blocks.1.hook_mlp_out"
    assert again.cfg.metadata.hook_point == "layers.1.mlp"
    x = inputs(seed=4)
    torch.testing.assert_close(again.encode(x), ref.encode(x), **CLOSE)
    torch.testing.assert_close(again(x), ref(x), **CLOSE)
    reloaded = load_sae(tmp_path / "b")
    assert reloaded.fingerprint == sae.fingerprint  # save() sets the fingerprint of what it wrote
    assert reloaded.fingerprint != load_sae(tmp_path / "a").fingerprint  # another file, another config


@pytest.mark.parametrize("architecture,cfg", [
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {"rescale_acts_by_decoder_norm": True}),
    ("topk", {"normalize_activations": "constant_norm_rescale"}),
    ("jumprelu", {"normalize_activations": "layer_norm"}),
    ("gated", {"normalize_activations": "constant_norm_rescale", "apply_b_dec_to_input": False}),
])
def test_saelens_options(sl, tmp_path, architecture, cfg):
    ref = make_saelens(sl, architecture, seed=7, **cfg)
    ref.save_model(tmp_path)
    sae = load_sae(tmp_path)
    x = inputs(seed=8)
    torch.testing.assert_close(sae.encode(x), ref.encode(x), **CLOSE)
    torch.testing.assert_close(sae(x), ref(x), **CLOSE)  # per-row normalization undone as SAELens does
    sae.save(tmp_path / "again")
    torch.testing.assert_close(sl.SAE.load_from_disk(str(tmp_path / "again")).encode(x), ref.encode(x), **CLOSE)


def test_expected_average_scaling_is_folded(sl, tmp_path):
    ref = make_saelens(sl, "topk", seed=9, normalize_activations="expected_average_only_in")
    ref.save_model(tmp_path)
    with pytest.raises(InputError, match="expected_average_only_in.*scaling_factor"):
        load_sae(tmp_path)
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.37, "has_whitening": False}))
    sae = load_sae(tmp_path)
    assert sae.normalize_activations == "none" and sae.metadata["mistudio_folded"]["scaling_factor"] == 0.37
    ref.fold_activation_norm_scaling_factor(0.37)  # what SAELens's trainer does at the end of training
    x = inputs(seed=10) * 20
    torch.testing.assert_close(sae.encode(x), ref.encode(x), **CLOSE)
    torch.testing.assert_close(sae(x), ref(x), **CLOSE)
    unscaled = load_sae(tmp_path, scaling_factor=1.0)  # as sae_lens.SAE.load_from_disk reads it
    plain = sl.SAE.load_from_disk(str(tmp_path))
    torch.testing.assert_close(unscaled.encode(x), plain.encode(x), **CLOSE)


@pytest.mark.parametrize("architecture,cfg", [("standard", {"apply_b_dec_to_input": False}),
                                              ("topk", {"rescale_acts_by_decoder_norm": True}), ("gated", {})])
def test_covariance_whitening_is_folded(sl, tmp_path, architecture, cfg):
    ref = make_saelens(sl, architecture, seed=11, normalize_activations="covariance_whitening", **cfg)
    ref.save_model(tmp_path)
    with pytest.raises(InputError, match="activation_whitening.safetensors"):
        load_sae(tmp_path)
    g = torch.Generator().manual_seed(12)
    matrix = (torch.eye(D_IN) + 0.1 * torch.randn(D_IN, D_IN, generator=g)).double()
    mean = torch.randn(D_IN, generator=g).double()
    save_file({"mean": mean, "matrix": matrix, "inverse_matrix": torch.linalg.inv(matrix).contiguous()},
              tmp_path / "activation_whitening.safetensors")
    sae = load_sae(tmp_path)
    ref.fold_activation_whitening(mean, matrix, torch.linalg.inv(matrix))
    x = inputs(seed=13)
    torch.testing.assert_close(sae.encode(x), ref.encode(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae(x), ref(x), rtol=1e-4, atol=1e-5)


def test_legacy_saelens_config(sl, tmp_path):
    """SAELens < 6 kept hook_point, activation_fn_str and a boolean normalize_activations at the top level."""
    ref = make_saelens(sl, "topk", seed=14)
    weights = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(weights, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.1.hook_mlp_out", "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K}, "normalize_activations": False, "dtype": "torch.float32",
        "sae_lens_version": "3.13.0", "model_name": "gpt2"}))
    sae = load_sae(tmp_path)
    assert (sae.architecture, sae.k, sae.hook_point, sae.metadata["model_name"]) == ("topk", K, "layers.1.mlp", "gpt2")
    x = inputs(seed=15)
    torch.testing.assert_close(sae.encode(x), sl.SAE.load_from_disk(str(tmp_path)).encode(x), **CLOSE)
    sae.save(tmp_path / "new")  # written in the 6.x layout, which keeps the metadata
    assert sl.SAE.load_from_disk(str(tmp_path / "new")).cfg.metadata.hook_name == "blocks.1.hook_mlp_out"


def test_legacy_weight_names_are_folded(tmp_path):
    """Old JumpReLU files store log_threshold; old SAELens a finetuning scaling_factor of the latents."""
    g = torch.Generator().manual_seed(16)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.3, "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
         "b_enc": torch.randn(D_SAE, generator=g) * 0.1, "b_dec": torch.randn(D_IN, generator=g) * 0.1,
         "log_threshold": torch.randn(D_SAE, generator=g) * 0.3 - 1,
         "scaling_factor": torch.rand(D_SAE, generator=g) + 0.5}
    save_file(w, tmp_path / "sae_weights.safetensors")
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE,
                                                   "finetuning_scaling_factor": True,
                                                   "hook_name": "blocks.0.hook_resid_post"}))
    sae = load_sae(tmp_path)
    x = inputs(seed=17)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    z = torch.relu(pre) * (pre > w["log_threshold"].exp())
    assert 0 < (z > 0).sum() < z.numel()
    torch.testing.assert_close(sae.encode(x), z, **CLOSE)
    torch.testing.assert_close(sae.decode(z), (z * w["scaling_factor"]) @ w["W_dec"] + w["b_dec"], **CLOSE)


def test_dtype_and_device(sl, tmp_path):
    ref = make_saelens(sl, "jumprelu", seed=18)
    ref.save_model(tmp_path)
    sae = load_sae(tmp_path, device="cpu", dtype="bfloat16")
    assert sae.dtype == torch.bfloat16 and sae.device.type == "cpu"
    x = inputs(seed=19)
    theirs = sl.SAE.load_from_disk(str(tmp_path), dtype="bfloat16").encode(x)
    ours = sae.encode(x)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs)  # bfloat16 on both sides: the same operations in the same order
    assert load_sae(tmp_path, dtype=torch.float64).encode(x).dtype == torch.float64
    with pytest.raises(InputError, match="dtype='int8'"):
        load_sae(tmp_path, dtype="int8")


# -- sparse latents -----------------------------------------------------------------------------------
def test_encode_sparse_topk_fixed_width(sl, tmp_path):
    make_saelens(sl, "topk", seed=20).save_model(tmp_path)
    sae = load_sae(tmp_path)
    x = inputs(seed=21).reshape(8, 8, D_IN)
    latents = sae.encode_sparse(x)
    assert isinstance(latents, SparseLatents)
    assert (latents.width, latents.n_rows, latents.nnz) == (K, 64, 64 * K)
    indices, values = latents.fixed()
    assert indices.shape == values.shape == (64, K) and indices.dtype == torch.int64
    dense = sae.encode(x).reshape(64, D_SAE)
    torch.testing.assert_close(latents.to_dense(), dense)
    torch.testing.assert_close(sae.decode(latents), sae.decode(dense), **CLOSE)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated"])
def test_encode_sparse_csr(sl, tmp_path, architecture):
    make_saelens(sl, architecture, seed=22).save_model(tmp_path)
    sae = load_sae(tmp_path)
    x = inputs(seed=23)
    latents = sae.encode_sparse(x)
    dense = sae.encode(x)
    assert latents.width is None and latents.n_rows == 64
    assert latents.nnz == int((dense != 0).sum())
    counts = latents.offsets.diff()
    assert counts.tolist() == (dense != 0).sum(-1).tolist()
    assert bool((latents.values != 0).all())
    torch.testing.assert_close(latents.to_dense(), dense)
    torch.testing.assert_close(sae.decode(latents), sae.decode(dense), **CLOSE)
    with pytest.raises(InputError, match="variable number"):
        latents.fixed()


# -- sparsify -----------------------------------------------------------------------------------------
def write_sparsify(folder, seed: int = 0, k: int = K, skip: bool = False, activation: str = "topk", **extra):
    """A sparsify SparseCoder folder as save_to_disk writes it: cfg.json (config + d_in) and sae.safetensors."""
    g = torch.Generator().manual_seed(seed)
    w = {"encoder.weight": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
         "encoder.bias": torch.randn(D_SAE, generator=g) * 0.1,
         "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.3, "b_dec": torch.randn(D_IN, generator=g) * 0.2}
    if skip:
        w["W_skip"] = torch.randn(D_IN, D_IN, generator=g) * 0.1
    folder.mkdir(parents=True)
    save_file(w, folder / "sae.safetensors")
    cfg = {"activation": activation, "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": k,
           "multi_topk": False, "skip_connection": skip, "transcode": False, "d_in": D_IN, **extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return w


def test_sparsify_layout(tmp_path):
    w = write_sparsify(tmp_path / "layers.6", seed=24, skip=True)
    write_sparsify(tmp_path / "layers.10", seed=25)
    (tmp_path / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    with pytest.raises(InputError, match=r"2 hook points \(layers\.6, layers\.10\).*load_sae\(.*layers\.6"):
        load_sae(tmp_path)
    sae = load_sae(tmp_path / "layers.6")
    assert (sae.source, sae.architecture, sae.k, sae.hook_name, sae.hook_point) == \
        ("sparsify", "topk", K, "layers.6", "layers.6.residual")
    assert sae.metadata["model_name"] == "EleutherAI/pythia-70m"
    x = inputs(seed=26)
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])  # sparsify's fused_encoder
    values, indices = pre.topk(K, dim=-1)
    dense = torch.zeros(64, D_SAE).scatter_(-1, indices, values)
    torch.testing.assert_close(sae.encode(x), dense, **CLOSE)
    out = dense @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
    torch.testing.assert_close(sae(x), out, **CLOSE)
    with pytest.raises(InputError, match="skip connection"):
        sae.save(tmp_path / "out")


def test_sparsify_package(sl, tmp_path):
    sparsify = pytest.importorskip("sparsify")
    for activation, skip in (("topk", True), ("topk", False), ("groupmax", False)):
        torch.manual_seed(27)
        ref = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K, activation=activation,
                                                                    skip_connection=skip))
        randomize(ref, 28)
        folder = tmp_path / activation / str(skip) / "layers.3.mlp"
        ref.save_to_disk(folder)
        sae = load_sae(folder)
        assert sae.hook_point == "layers.3.mlp"
        x = inputs(seed=29)
        with torch.no_grad():
            top_acts, top_indices, _ = ref.encode(x)
            dense = torch.zeros(64, D_SAE).scatter_(-1, top_indices, top_acts)
            torch.testing.assert_close(sae.encode(x), dense, **CLOSE)
            torch.testing.assert_close(sae.decode(dense), ref.decode(top_acts, top_indices), **CLOSE)
            torch.testing.assert_close(sae(x), ref(x).sae_out, **CLOSE)
            latents = sae.encode_sparse(x)
            assert latents.width == K
            torch.testing.assert_close(sae.decode(latents), ref.decode(top_acts, top_indices), **CLOSE)
        if activation == "topk" and not skip:  # expressible in SAELens's format
            sae.save(tmp_path / "as_saelens")
            torch.testing.assert_close(sl.SAE.load_from_disk(str(tmp_path / "as_saelens")).encode(x), dense, **CLOSE)
        elif activation == "groupmax":
            with pytest.raises(InputError, match="groupmax"):
                sae.save(tmp_path / "nope")


# -- hook names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,expected", [
    ("blocks.5.hook_resid_post", "layers.5.residual"),
    ("blocks.5.hook_resid_pre", "layers.4.residual"),
    ("blocks.1.hook_resid_pre", "layers.0.residual"),
    ("blocks.0.hook_mlp_out", "layers.0.mlp"),
    ("blocks.11.hook_attn_out", "layers.11.attention"),
    ("layers.6", "layers.6.residual"),
    ("layers.6.mlp", "layers.6.mlp"),
    ("layers.6.self_attn", "layers.6.attention"),
    ("layers.6.attn", "layers.6.attention"),
    ("layers.6.attention", "layers.6.attention"),
    ("gpt_neox.layers.2.attention", "layers.2.attention"),
    ("h.3.attn", "layers.3.attention"),
    ("layers.2.residual", "layers.2.residual"),
    ("blocks.3.hook_resid_mid", None),
    ("blocks.3.attn.hook_z", None),
    ("blocks.3.hook_mlp_in", None),
    ("layers.3.mlp.act_fn", None),
    ("something_else", None),
    (None, None),
])
def test_hook_point_of(name, expected):
    assert hook_point_of(name) == expected


@pytest.mark.parametrize("name", ["blocks.0.hook_resid_pre", "hook_embed", "embed_tokens", "model.embed_tokens"])
def test_embeddings_are_refused(name):
    with pytest.raises(InputError, match="embeddings"):
        hook_point_of(name)


def test_tl_hook_name():
    assert [tl_hook_name(f"layers.4.{k}") for k in ("residual", "mlp", "attention")] == \
        ["blocks.4.hook_resid_post", "blocks.4.hook_mlp_out", "blocks.4.hook_attn_out"]
    with pytest.raises(InputError, match="'blocks.4'"):
        tl_hook_name("blocks.4")


def test_check_applies(tmp_path):
    sae = SAE("standard", D_IN, D_SAE, hook_name="blocks.2.hook_mlp_out")
    check_applies(sae, "layers.2.mlp", D_IN)
    with pytest.raises(InputError, match=r"width 32.*has width 64"):
        check_applies(sae, "layers.2.mlp", 64)
    with pytest.raises(InputError, match=r"trained on blocks.2.hook_mlp_out \(mistudio hook point layers.2.mlp\), "
                                         r"not on layers.2.residual"):
        check_applies(sae, "layers.2.residual", D_IN)
    unknown = SAE("standard", D_IN, D_SAE, hook_name="my_custom_hook")
    assert unknown.hook_point is None
    check_applies(unknown, "layers.2.residual", D_IN)  # a name mistudio cannot read: the caller names the point
    for name, words in [("blocks.2.hook_resid_mid", "between block 2's attention and its MLP"),
                        ("blocks.2.attn.hook_z", "attention heads' outputs before W_O"),
                        ("blocks.2.ln2.hook_normalized", r"a hook inside block 2 \(ln2.hook_normalized\)"),
                        ("blocks.2.hook_mlp_in", r"a hook inside block 2 \(hook_mlp_in\)"),
                        ("model.layers.2.post_attention_layernorm", r"a module inside layer 2"),
                        ("layers.2.mlp.act_fn", r"a module inside layer 2 \(mlp.act_fn\)")]:
        inside = SAE("standard", D_IN, D_SAE, hook_name=name)
        with pytest.raises(InputError, match=rf"{re.escape(name)}', .*{words}.*does not capture.*sae.hook_point ="):
            check_applies(inside, "layers.2.residual", D_IN)
    unknown = SAE("standard", D_IN, D_SAE, hook_name="blocks.2.hook_resid_mid")
    assert unknown.hook_point is None
    embeddings = SAE("standard", D_IN, D_SAE, hook_name="blocks.0.hook_resid_pre")
    with pytest.raises(InputError, match="embeddings"):
        check_applies(embeddings, "layers.0.residual", D_IN)
    embeddings.hook_point = "layers.0.residual"  # the caller knows better: allowed
    check_applies(embeddings, "layers.0.residual", D_IN)
    unknown.hook_point = "layers.2.residual"  # and save() keeps what the caller said
    unknown.save(tmp_path / "unknown")
    assert load_sae(tmp_path / "unknown").hook_point == "layers.2.residual"


# -- errors -------------------------------------------------------------------------------------------
def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"not an SAE folder \(found: nothing\)"):
        load_sae(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"found: config.json, model.safetensors"):
        load_sae(tmp_path / "other")
    with pytest.raises(InputError, match="is a file"):
        load_sae(tmp_path / "other" / "model.safetensors")


def write_saelens(folder, cfg: dict, weights: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    if weights is None:
        weights = {"W_enc": torch.zeros(D_IN, D_SAE), "W_dec": torch.zeros(D_SAE, D_IN), "b_enc": torch.zeros(D_SAE),
                   "b_dec": torch.zeros(D_IN)}
    save_file(weights, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
                                                 "metadata": {"sae_lens_version": "6.5.0"}, **cfg}))


@pytest.mark.parametrize("cfg,weights,message", [
    ({"architecture": "matching_pursuit"}, None, "architecture 'matching_pursuit'"),
    ({"architecture": "batchtopk"}, None, "save_inference_model"),
    ({"architecture": "transcoder"}, None, "transcoder"),
    ({"architecture": "topk"}, None, "top-k SAE without k"),
    ({"architecture": "standard", "d_sae": "128"}, None, "d_sae='128'"),
    ({"architecture": "standard", "dtype": "int4"}, None, "dtype 'int4'"),
    ({"architecture": "standard", "normalize_activations": "whatever"}, None, "normalize_activations='whatever'"),
    ({"architecture": "jumprelu"}, None, r"lacks threshold \(it holds W_dec, W_enc, b_dec, b_enc\)"),
    ({"architecture": "standard"}, {"W_enc": torch.zeros(D_IN, 64), "W_dec": torch.zeros(D_SAE, D_IN),
                                    "b_enc": torch.zeros(D_SAE), "b_dec": torch.zeros(D_IN)},
     r"W_enc has shape \(32, 64\), the config says \(32, 128\)"),
])
def test_saelens_errors(tmp_path, cfg, weights, message):
    write_saelens(tmp_path, cfg, weights)
    with pytest.raises(InputError, match=message):
        load_sae(tmp_path)


def test_other_load_errors(tmp_path):
    write_saelens(tmp_path / "plain", {"architecture": "standard"})
    with pytest.raises(InputError, match="scaling_factor=2.0 applies to SAEs with normalize_activations"):
        load_sae(tmp_path / "plain", scaling_factor=2.0)
    write_saelens(tmp_path / "scaled", {"architecture": "standard",
                                        "normalize_activations": "expected_average_only_in"})
    with pytest.raises(InputError, match="scaling_factor=-1 must be a positive number"):
        load_sae(tmp_path / "scaled", scaling_factor=-1)
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "cfg.json").write_text("{not json")
    (tmp_path / "bad_json" / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="cannot be read as JSON"):
        load_sae(tmp_path / "bad_json")
    write_sparsify(tmp_path / "transcoder", transcode=True)
    with pytest.raises(InputError, match="transcoder"):
        load_sae(tmp_path / "transcoder")
    write_sparsify(tmp_path / "signed", signed=True)
    with pytest.raises(InputError, match="signed"):
        load_sae(tmp_path / "signed")
    write_sparsify(tmp_path / "groups", activation="groupmax", k=5)
    with pytest.raises(InputError, match="multiple of k"):
        load_sae(tmp_path / "groups")
    with pytest.raises(InputError, match="scaling_factor=1.0 applies to SAELens"):
        load_sae(tmp_path / "plain" / ".." / "groups", scaling_factor=1.0)


def test_apply_errors_and_constructor():
    sae = SAE("topk", D_IN, D_SAE, k=K)
    with pytest.raises(InputError, match=r"width d_in=32, got a tensor of shape \(4, 31\)"):
        sae.encode(torch.zeros(4, 31))
    with pytest.raises(InputError, match="d_sae=128"):
        sae.decode(torch.zeros(4, 3))
    with pytest.raises(InputError, match=r"k=0: a top-k SAE needs 1 <= k <= d_sae"):
        SAE("topk", D_IN, D_SAE, k=0)
    with pytest.raises(InputError, match="architecture='relu'"):
        SAE("relu", D_IN, D_SAE)
    with pytest.raises(InputError, match="k=4 applies to top-k SAEs only"):
        SAE("standard", D_IN, D_SAE, k=4)
    with pytest.raises(InputError, match="hook_point='blocks.1'"):
        SAE("standard", D_IN, D_SAE, hook_point="blocks.1")
    assert math.isfinite(float(sae(torch.zeros(2, D_IN)).sum()))
    assert len(sae.fingerprint) == 64
