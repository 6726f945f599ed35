import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from posttrain.analysis.checkpoints import Checkpoint, classify
from posttrain.analysis.diff import diff
from posttrain.errors import UserError
from posttrain.models.loading import load_model


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tmp_path_factory):
    """The tiny base and a fine-tuned copy: q_proj of layer 1 and the MLP of layer 0 perturbed."""
    model, tok = load_model(tiny_checkpoint)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.add_(0.05 * torch.randn(model.model.layers[1].self_attn.q_proj.weight.shape, generator=g))
        model.model.layers[0].mlp.down_proj.weight.mul_(1.1)
    root = tmp_path_factory.mktemp("pair")
    model.save_pretrained(root / "ft", safe_serialization=True)
    tok.save_pretrained(root / "ft")
    model.save_pretrained(root / "ft_sharded", safe_serialization=True, max_shard_size="20KB")
    return tiny_checkpoint, root / "ft", root / "ft_sharded"


def relative_updates(base, other):
    """One model's element-wise diff: its summary and per-tensor rows."""
    res = diff(base, {"m": other}, show_progress=False)
    return res.summaries["m"], res.tables["m"]


def numpy_rel(base_dir, ft_dir):
    a, b = load_file(str(base_dir / "model.safetensors")), load_file(str(ft_dir / "model.safetensors"))
    per = {n: np.linalg.norm((b[n].astype(np.float64) - a[n].astype(np.float64)).ravel()) / np.linalg.norm(a[n].astype(np.float64).ravel())
           for n in a}
    return a, b, per


def test_relative_updates_match_numpy(pair):
    base, ft, _ = pair
    summary, rows = relative_updates(base, ft)
    a, b, per = numpy_rel(base, ft)
    got = dict(zip(rows["name"], rows["rel_update"]))
    for name, value in per.items():
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12)
    # per-module aggregate = sqrt(sum ||dW||^2) / sqrt(sum ||W||^2) over that module's tensors
    q = [n for n in a if ".q_proj." in n]
    expect = math.sqrt(sum(np.sum((b[n].astype(np.float64) - a[n]) ** 2) for n in q)) / math.sqrt(sum(np.sum(a[n].astype(np.float64) ** 2) for n in q))
    assert summary.rel_update_by_module["q_proj"] == pytest.approx(expect, rel=1e-9)
    # the planted changes are exactly where they were planted
    cells = summary.rel_update_by_layer_module
    assert cells["q_proj"][0] == 0 and cells["q_proj"][1] > 0
    assert cells["down_proj"][0] == pytest.approx(0.1, rel=1e-6) and cells["down_proj"][1] == 0
    assert summary.rel_update_by_module["k_proj"] == 0 and len(summary.rel_update_by_layer) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_match_numpy_on_the_stored_values(pair, dtype, tmp_path):
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file

    base, ft, _ = pair
    stored = {}
    for src, name in ((base, "b"), (ft, "t")):
        t = {k: v.to(dtype) for k, v in load_torch(str(src / "model.safetensors")).items()}
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / "model.safetensors"))
        stored[name] = {k: v.double().numpy() for k, v in t.items()}  # exact: every half value is a double
    res = diff(tmp_path / "b", {"t": tmp_path / "t"}, spectral=True, show_progress=False)
    got = dict(zip(res.tables["t"]["name"], res.tables["t"]["rel_update"]))
    for n, wb in stored["b"].items():
        expect = np.linalg.norm((stored["t"][n] - wb).ravel()) / np.linalg.norm(wb.ravel())
        assert got[n] == pytest.approx(expect, rel=1e-6, abs=1e-12), n  # computed in float32
    row = res.tables["t"].set_index("name").loc["model.layers.0.mlp.down_proj.weight"]
    # x1.1 survives rounding to half precision to about its mantissa: 8 bits for bfloat16, 11 for float16
    assert row["sv_rel_change_top"] == pytest.approx(0.1, abs=0.02 if dtype == torch.bfloat16 else 2e-3)


def test_sharded_checkpoint_gives_same_result(pair):
    base, ft, sharded = pair
    assert (sharded / "model.safetensors.index.json").is_file()
    s1, r1 = relative_updates(base, ft)
    s2, r2 = relative_updates(base, sharded)
    assert s1.to_json() == s2.to_json()


def test_diff_writes_outputs(pair, tmp_path):
    base, ft, _ = pair
    import pandas as pd

    res = diff(base, {"ft": ft}, tmp_path / "out", show_progress=False)
    out = tmp_path / "out"
    for f in ("rel_update_heatmap.png", "rel_update_by_module.png"):
        assert (out / f).read_bytes()[:4] == b"\x89PNG"
    js = json.loads((out / "diff.json").read_text())
    assert js["models"]["ft"]["rel_update_by_module"] == res.summaries["ft"].rel_update_by_module
    # the tables on disk hold the per-tensor numbers, which match numpy
    _, _, per = numpy_rel(base, ft)
    for table in (pd.read_csv(out / "tensors.csv"), pd.read_parquet(out / "tensors.parquet")):
        got = dict(zip(table["name"], table["rel_update"]))
        assert set(got) == set(per) and set(table["model"]) == {"ft"}
        for name, value in per.items():
            assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-12), name


def test_mismatch_and_corruption_are_clear_errors(pair, tmp_path):
    base, ft, _ = pair
    model, tok = load_model(ft)
    from posttrain.config import ModelConfig
    from posttrain.models.tiny import build_tiny_model

    other = build_tiny_model(ModelConfig(hidden_size=32, intermediate_size=80, num_layers=2, num_heads=2), len(tok), 0)
    other.save_pretrained(tmp_path / "wide", safe_serialization=True)
    with pytest.raises(UserError, match=r"architecture mismatch: .*mlp.*shape"):
        relative_updates(base, tmp_path / "wide")
    deeper = build_tiny_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2), len(tok), 0)
    deeper.save_pretrained(tmp_path / "deep", safe_serialization=True)
    with pytest.raises(UserError, match=r"only in .*layers\.2\."):
        relative_updates(base, tmp_path / "deep")
    (tmp_path / "bad").mkdir()
    data = (ft / "model.safetensors").read_bytes()
    (tmp_path / "bad" / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="corrupt or truncated|cannot read"):
        relative_updates(base, tmp_path / "bad")
    with pytest.raises(UserError, match="not found"):
        Checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no safetensors"):
        Checkpoint(tmp_path / "empty")


def _poisoned(ft, out, value: float):
    """A copy of checkpoint `ft` with one entry of layer 0's v_proj set to `value` (nan or inf)."""
    model, _ = load_model(ft)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = value
    model.save_pretrained(out, safe_serialization=True)
    return out


def test_nonfinite_weights_are_reported_not_fatal(pair, tmp_path):
    base, ft, _ = pair
    summary, _ = relative_updates(base, _poisoned(ft, tmp_path / "nan", float("nan")))
    assert summary.nonfinite == ["model.layers.0.self_attn.v_proj.weight"]
    assert math.isfinite(summary.rel_update_total)


@pytest.mark.parametrize("name,layer,module", [
    ("model.layers.3.self_attn.q_proj.weight", 3, "q_proj"),
    ("model.layers.3.self_attn.k_proj.bias", 3, "k_proj"),
    ("model.layers.0.mlp.gate_proj.weight", 0, "gate_proj"),
    ("model.layers.11.mlp.down_proj.weight", 11, "down_proj"),
    ("model.layers.2.post_feedforward_layernorm.weight", 2, "norm"),  # OLMo2 / Gemma2
    ("model.layers.2.self_attn.q_norm.weight", 2, "norm"),  # OLMo2 / Qwen3 qk-norm
    ("model.embed_tokens.weight", None, "embed"),
    ("lm_head.weight", None, "lm_head"),
    ("model.norm.weight", None, "norm"),
    ("transformer.h.5.attn.c_attn.weight", 5, "qkv_proj"),  # GPT-2
    ("transformer.h.5.attn.c_proj.weight", 5, "o_proj"),
    ("transformer.h.5.mlp.c_fc.weight", 5, "up_proj"),
    ("transformer.h.5.mlp.c_proj.weight", 5, "down_proj"),
    ("transformer.wte.weight", None, "embed"),
    ("transformer.wpe.weight", None, "pos_embed"),
    ("transformer.ln_f.weight", None, "norm"),
    ("model.layers.1.block_sparse_moe.experts.3.w1.weight", 1, "gate_proj"),  # Mixtral
    ("model.layers.1.block_sparse_moe.gate.weight", 1, "router"),
    ("something.completely.different", None, "other"),
    ("h.3.attn.c_attn.weight", 3, "qkv_proj"),  # GPT-2 saved without the "transformer." prefix
    ("h.3.mlp.c_proj.weight", 3, "down_proj"),
    ("h.3.attn.bias", 3, "other"),  # GPT-2's causal-mask buffer
    ("wte.weight", None, "embed"),
    ("language_model.model.layers.7.mlp.gate_proj.weight", 7, "gate_proj"),  # Gemma 3
    ("model.layers.7.pre_feedforward_layernorm.weight", 7, "norm"),  # Gemma 2/3
    ("model.layers.7.self_attn.k_norm.weight", 7, "norm"),  # Qwen3 / OLMo2
    ("model.layers.0.mlp.up_proj.weight", 0, "up_proj"),  # Mistral / Llama / Qwen2
])
def test_classify_names(name, layer, module):
    info = classify(name)
    assert (info.layer, info.module) == (layer, module)


# ------------------------------------------------------------------------------------------------
# planted ground truth: matrices with known SVDs, changed in known ways

import pandas as pd  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from posttrain.analysis.scan import DiffOptions, scan  # noqa: E402

THETA_Q, THETA_K, THETA_O = 0.3, 0.2, 0.4


def _orth(m, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


def _outside(Q, seed):
    """A unit vector orthogonal to the columns of Q."""
    v = torch.randn(Q.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = v - Q @ (Q.T @ v)
    return v / v.norm()


def _turn(Q, col, toward, theta):
    Q = Q.clone()
    Q[:, col] = math.cos(theta) * Q[:, col] + math.sin(theta) * toward
    return Q


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """float64 checkpoints: base, `rot` (planted rotations and scalings), `other` (a second update)."""
    root = tmp_path_factory.mktemp("planted")
    base, rot, other = {}, {}, {}
    # layer 0 q_proj, tall 64 x 48 (k = 3): left singular vector 0 turned by THETA_Q out of span(U)
    U, V, s = _orth(64, 48, 1), _orth(48, 48, 2), torch.linspace(10, 1, 48, dtype=torch.float64)
    base["model.layers.0.self_attn.q_proj.weight"] = U @ torch.diag(s) @ V.T
    rot["model.layers.0.self_attn.q_proj.weight"] = _turn(U, 0, _outside(U, 3), THETA_Q) @ torch.diag(s) @ V.T
    # layer 0 k_proj, wide 32 x 80 (k = 2): right singular vector 1 turned by THETA_K
    U, V, s = _orth(32, 32, 4), _orth(80, 32, 5), torch.linspace(5, 1, 32, dtype=torch.float64)
    base["model.layers.0.self_attn.k_proj.weight"] = U @ torch.diag(s) @ V.T
    rot["model.layers.0.self_attn.k_proj.weight"] = U @ torch.diag(s) @ _turn(V, 1, _outside(V, 6), THETA_K).T
    # layer 0 v_proj, square 40 x 40 (k = 2): top-2 singular values x1.25, bottom-2 x0.5
    U, V, s = _orth(40, 40, 7), _orth(40, 40, 8), torch.linspace(8, 1, 40, dtype=torch.float64)
    f = torch.ones(40, dtype=torch.float64)
    f[:2], f[-2:] = 1.25, 0.5
    base["model.layers.0.self_attn.v_proj.weight"] = U @ torch.diag(s) @ V.T
    rot["model.layers.0.self_attn.v_proj.weight"] = U @ torch.diag(s * f) @ V.T
    # layer 0 o_proj, square 40 x 40 (k = 2): the last left singular vector turned by THETA_O inside the
    # plane it spans with vector 20 (both turned, so U stays orthogonal)
    U, V, s = _orth(40, 40, 9), _orth(40, 40, 10), torch.linspace(8, 1, 40, dtype=torch.float64)
    U2 = U.clone()
    c, sn = math.cos(THETA_O), math.sin(THETA_O)
    U2[:, 39], U2[:, 20] = c * U[:, 39] + sn * U[:, 20], -sn * U[:, 39] + c * U[:, 20]
    base["model.layers.0.self_attn.o_proj.weight"] = U @ torch.diag(s) @ V.T
    rot["model.layers.0.self_attn.o_proj.weight"] = U2 @ torch.diag(s) @ V.T
    # layer 1 q_proj, 300 x 260 with a spectral gap after 3 (randomised SVD recovers the top-3 exactly)
    U, V = _orth(300, 260, 11), _orth(260, 260, 12)
    s = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.linspace(0.5, 0.1, 257)]).double()
    base["model.layers.1.self_attn.q_proj.weight"] = U @ torch.diag(s) @ V.T
    rot["model.layers.1.self_attn.q_proj.weight"] = _turn(U, 0, _outside(U, 13), THETA_Q) @ torch.diag(s) @ V.T
    base["model.layers.0.self_attn.q_proj.bias"] = torch.linspace(-1, 1, 64, dtype=torch.float64)
    rot["model.layers.0.self_attn.q_proj.bias"] = base["model.layers.0.self_attn.q_proj.bias"].clone()
    rot["model.layers.0.self_attn.q_proj.bias"][:4] += 1e-3
    g = torch.Generator().manual_seed(14)
    for name, w in base.items():
        other[name] = w + 0.01 * torch.randn(w.shape, generator=g, dtype=torch.float64) * (torch.rand(w.shape, generator=g) < 0.5)
    for d, tensors in (("base", base), ("rot", rot), ("other", other)):
        (root / d).mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / d / "model.safetensors"))
    return root, base, rot, other


def _row(res, model, name):
    t = res.tables[model]
    return t[t["name"] == name].iloc[0]


DEG = 180 / math.pi


def test_planted_rotations_and_scalings_are_recovered(planted, tmp_path):
    root, base, rot, _ = planted
    res = diff(root / "base", {"rot": root / "rot"}, tmp_path / "out", spectral=True, show_progress=False)
    q = _row(res, "rot", "model.layers.0.self_attn.q_proj.weight")
    assert q["svd"] == "full" and q["k"] == 3
    assert q["angle_top_max_left"] == pytest.approx(THETA_Q * DEG, abs=1e-4)
    assert q["angle_top_left"] == pytest.approx(THETA_Q * DEG / 3, abs=1e-4)
    assert q["angle_top_right"] == pytest.approx(0, abs=1e-4)
    assert q["proj_dist_top_left"] == pytest.approx(math.sqrt(2) * math.sin(THETA_Q), abs=1e-8)
    assert q["alignment_top_left"] == pytest.approx(1 - math.sin(THETA_Q) ** 2 / 3, abs=1e-8)
    assert q["sv_rel_change_top"] == pytest.approx(0, abs=1e-10) and q["sv_rel_change_all"] == pytest.approx(0, abs=1e-10)
    assert q["angle_bottom_left"] == pytest.approx(0, abs=1e-4)
    # the wide matrix is decomposed transposed; its planted change must still be on the right side
    k = _row(res, "rot", "model.layers.0.self_attn.k_proj.weight")
    assert k["k"] == 2
    assert k["angle_top_max_right"] == pytest.approx(THETA_K * DEG, abs=1e-4)
    assert k["angle_top_right"] == pytest.approx(THETA_K * DEG / 2, abs=1e-4)
    assert k["angle_top_left"] == pytest.approx(0, abs=1e-4)
    v = _row(res, "rot", "model.layers.0.self_attn.v_proj.weight")
    assert v["sv_rel_change_top"] == pytest.approx(0.25, abs=1e-10)
    assert v["sv_rel_change_bottom"] == pytest.approx(0.5, abs=1e-10)
    assert v["angle_top_left"] == pytest.approx(0, abs=1e-4) and v["angle_bottom_right"] == pytest.approx(0, abs=1e-4)
    # dW = U diag(ds) V^T is diagonal in the base's singular basis: all magnitude, no rotation
    assert v["energy_magnitude"] == pytest.approx(1.0, abs=1e-10) and v["energy_rotation"] == pytest.approx(0, abs=1e-10)
    assert v["energy_diag_in_span"] == pytest.approx(1.0, abs=1e-10)
    s = np.linspace(8, 1, 40)
    ds = np.abs(np.concatenate([0.25 * s[:2], 0.5 * s[-2:]]))
    assert v["stable_rank_delta"] == pytest.approx((ds**2).sum() / ds.max() ** 2, rel=1e-9)
    p = ds / ds.sum()
    assert v["effective_rank_delta"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    o = _row(res, "rot", "model.layers.0.self_attn.o_proj.weight")
    assert o["angle_bottom_left"] == pytest.approx(THETA_O * DEG / 2, abs=1e-4)
    assert o["angle_top_left"] == pytest.approx(0, abs=1e-4) and o["angle_bottom_right"] == pytest.approx(0, abs=1e-4)
    assert o["energy_rotation"] > 0.5  # a rotation is off-diagonal energy
    # the angle curve puts the o_proj rotation in the bottom range and the q_proj one at the top
    cur = res.curves
    oc = cur[(cur["name"] == "model.layers.0.self_attn.o_proj.weight") & (cur["side"] == "left")].sort_values("bin")
    assert oc["angle"].iloc[-1] == pytest.approx(THETA_O * DEG / 2, abs=1e-4)
    qc = cur[(cur["name"] == "model.layers.0.self_attn.q_proj.weight") & (cur["side"] == "left")].sort_values("bin")
    assert qc["angle"].iloc[0] > 1 and qc["angle"].iloc[-1] == pytest.approx(0, abs=1e-4)
    # the summary keys of the results.json contract
    js = json.loads((tmp_path / "out" / "diff.json").read_text())["models"]["rot"]
    mats = res.tables["rot"][res.tables["rot"]["svd"] != ""]
    expect = ((mats["angle_top_left"] + mats["angle_top_right"]) / 2).mean()
    assert js["principal_angle_top"] == pytest.approx(expect, rel=1e-12)
    assert js["sv_rel_change_top"] == pytest.approx(mats["sv_rel_change_top"].mean(), rel=1e-12)
    for key in ("rel_update_total", "rel_update_by_module", "rel_update_by_layer", "rel_update_by_layer_module",
                "principal_angle_top_by_module", "angle_curve", "spectra", "alpha_by_layer"):
        assert key in js
    assert js["principal_angle_top_by_layer_module"]["o_proj"][0] == pytest.approx(
        (o["angle_top_left"] + o["angle_top_right"]) / 2, rel=1e-12)
    for f in ("tensors.parquet", "angle_curves.csv", "spectra.parquet", "angle_curves.png", "spectra.png",
              "principal_angle_heatmap.png", "sv_change_heatmap.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    sp = pd.read_parquet(tmp_path / "out" / "spectra.parquet")
    sv = sp[sp["name"] == "model.layers.0.self_attn.v_proj.weight"].iloc[0]
    assert np.allclose(sv["sv_base"], np.linspace(8, 1, 40))
    assert np.allclose(sv["sv_ft"], np.sort(np.linspace(8, 1, 40) * f_v())[::-1])


def f_v():
    f = np.ones(40)
    f[:2], f[-2:] = 1.25, 0.5
    return f


@pytest.mark.parametrize("path", ["gram", "chunked", "randomized"])
def test_other_decompositions_recover_the_same_planted_answers(planted, path):
    root, *_ = planted
    from posttrain.analysis.checkpoints import check_compatible

    b, r = Checkpoint(root / "base"), Checkpoint(root / "rot")
    opts = {"gram": DiffOptions(spectral=True, gram_min_numel=1, gram_min_aspect=1.0, chunk_elems=500),
            "chunked": DiffOptions(spectral=True, chunk_elems=500),
            "randomized": DiffOptions(spectral=True, svd="randomized", rank=3)}[path]
    names = check_compatible(b, r)
    got = pd.DataFrame(scan(b, {"rot": r}, names, opts).rows["rot"]).set_index("name")
    ref = pd.DataFrame(scan(b, {"rot": r}, names, DiffOptions(spectral=True)).rows["rot"]).set_index("name")
    q1 = "model.layers.1.self_attn.q_proj.weight"
    assert got.loc[q1, "angle_top_max_left"] == pytest.approx(THETA_Q * DEG, abs=1e-4)
    assert got.loc[q1, "svd"] == {"gram": "gram", "chunked": "full", "randomized": "randomized"}[path]
    if path == "randomized":
        assert math.isnan(got.loc[q1, "angle_bottom_left"]) and math.isnan(got.loc[q1, "alpha_ft"])
        return
    cols = ["angle_top_left", "angle_top_right", "angle_bottom_left", "angle_bottom_right", "sv_rel_change_top",
            "sv_rel_change_bottom", "energy_rotation", "stable_rank_delta", "alpha_base", "rel_update",
            "changed_frac", "unchanged_frac"]
    mats = ref["svd"] != ""
    assert np.allclose(got.loc[mats, cols].to_numpy(float), ref.loc[mats, cols].to_numpy(float), atol=1e-4, equal_nan=True)


def test_sparsity_and_pair_cosines_match_numpy(planted):
    root, base, rot, other = planted
    res = diff(root / "base", {"rot": root / "rot", "other": root / "other"}, show_progress=False)
    for name in base:
        a, b = base[name].numpy(), rot[name].numpy()
        r = _row(res, "rot", name)
        assert r["changed_frac"] == pytest.approx(np.mean(np.abs(b - a) > 1e-5), abs=1e-12)
        assert r["unchanged_frac"] == pytest.approx(np.mean(b == a), abs=1e-12)
    bias = _row(res, "rot", "model.layers.0.self_attn.q_proj.bias")
    assert bias["changed_frac"] == pytest.approx(4 / 64) and bias["unchanged_frac"] == pytest.approx(60 / 64)
    assert res.summaries["rot"].changed_frac == pytest.approx(
        sum(np.sum(np.abs(rot[n].numpy() - base[n].numpy()) > 1e-5) for n in base) / sum(w.numel() for w in base.values()))
    pair = res.pairs[("rot", "other")]
    da = np.concatenate([(rot[n] - base[n]).numpy().ravel() for n in base])
    db = np.concatenate([(other[n] - base[n]).numpy().ravel() for n in base])
    assert pair.cosine_total == pytest.approx(da @ db / np.linalg.norm(da) / np.linalg.norm(db), rel=1e-9)
    wb = np.concatenate([w.numpy().ravel() for w in base.values()])
    assert pair.rel_distance_total == pytest.approx(np.linalg.norm(da - db) / np.linalg.norm(wb), rel=1e-9)
    n = "model.layers.0.self_attn.v_proj.weight"
    a1, b1 = (rot[n] - base[n]).numpy().ravel(), (other[n] - base[n]).numpy().ravel()
    assert pair.cosine_by_layer_module["v_proj"][0] == pytest.approx(a1 @ b1 / np.linalg.norm(a1) / np.linalg.norm(b1), rel=1e-9)


def test_sharded_checkpoint_gives_the_same_spectral_result(pair):
    base, ft, sharded = pair
    r1 = diff(base, {"ft": ft}, spectral=True, show_progress=False)
    r2 = diff(base, {"ft": sharded}, spectral=True, show_progress=False)
    assert r1.summaries["ft"].to_json() == r2.summaries["ft"].to_json()
    num = r1.table.select_dtypes("number").columns
    assert np.array_equal(r1.table[num].to_numpy(), r2.table[num].to_numpy(), equal_nan=True)


def test_esd_mode_matches_the_spectral_alpha(pair):
    from posttrain.analysis import spectral as sp

    base, ft, _ = pair
    full = diff(base, {"ft": ft}, spectral=True, show_progress=False).tables["ft"].set_index("name")
    esd = diff(base, {"ft": ft}, esd=True, show_progress=False).tables["ft"].set_index("name")
    mats = full["svd"] != ""
    assert set(esd.loc[mats, "svd"]) == {"values"} and esd.loc[mats, "angle_top_left"].isna().all()
    for col in ("alpha_base", "alpha_ft", "stable_rank_ft", "sv_rel_change_top", "log_spectral_norm_ft"):
        assert np.allclose(esd.loc[mats, col], full.loc[mats, col], rtol=1e-9, equal_nan=True)
    w = Checkpoint(ft).get("model.layers.0.mlp.down_proj.weight").double()
    fit = sp.esd_powerlaw(torch.linalg.svdvals(w) ** 2)
    assert esd.loc["model.layers.0.mlp.down_proj.weight", "alpha_ft"] == pytest.approx(fit.alpha, rel=1e-9)


def test_nonfinite_weights_with_spectral_are_reported(pair, tmp_path):
    base, ft, _ = pair
    res = diff(base, {"inf": _poisoned(ft, tmp_path / "inf", float("inf"))}, tmp_path / "out", spectral=True,
               show_progress=False)
    s = res.summaries["inf"]
    assert s.nonfinite == ["model.layers.0.self_attn.v_proj.weight"]
    assert s.has_spectral and math.isfinite(s.principal_angle_top)
    js = json.loads((tmp_path / "out" / "diff.json").read_text())  # strict JSON: no NaN literals
    assert js["models"]["inf"]["nonfinite"] == s.nonfinite


def test_failed_diff_keeps_existing_outputs_and_bad_options_are_user_errors(pair, planted, tmp_path):
    base, ft, _ = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "diff.json").write_text('{"old": true}')
    with pytest.raises(UserError, match="architecture mismatch"):
        diff(base, {"x": planted[0] / "rot"}, out, spectral=True, show_progress=False)
    assert json.loads((out / "diff.json").read_text()) == {"old": True}
    for kw, match in (({"rank": 0}, "rank"), ({"top_frac": 1.5}, "top_frac"), ({"svd": "fast"}, "svd"),
                      ({"rank": 3, "top_frac": 0.1}, "either"), ({"compare_pairs": [("ft", "nope")]}, "unknown model")):
        with pytest.raises(UserError, match=match):
            diff(base, {"ft": ft}, show_progress=False, **kw)


def test_trajectory_over_step_checkpoints(pair, tmp_path):
    import shutil

    from posttrain.analysis.trajectory import discover_runs, trajectory

    base, ft, _ = pair
    run = tmp_path / "run"
    model, tok = load_model(ft)
    w = model.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        for step in (10, 20):
            w.mul_(1.5)  # same direction, growing
            model.save_pretrained(run / "methods" / "grpo" / "checkpoints" / f"step-{step}", safe_serialization=True)
    shutil.copytree(run / "methods" / "grpo", run / "methods" / "sft")
    (run / "methods" / "grpo" / "checkpoints" / "step-20" / "value_head.safetensors").write_bytes(b"not the model")
    runs = discover_runs([run])
    assert list(runs) == ["grpo", "sft"] and [s for s, _ in runs["grpo"]] == [10, 20]
    tr = trajectory(base, runs, tmp_path / "traj", show_progress=False)
    pts = [p for p in tr.points if p["run"] == "grpo"]
    assert [p["step"] for p in pts] == [10, 20]
    assert pts[1]["rel_update_total"] > pts[0]["rel_update_total"] > 0
    assert pts[0]["cosine_prev"] is None and pts[1]["cosine_prev"] > 0.9
    for f in ("trajectory.json", "trajectory.csv", "trajectory.png", "tensors.parquet", "diff.json"):
        assert (tmp_path / "traj" / f).stat().st_size > 0
    with pytest.raises(UserError, match="no step-"):
        discover_runs([tmp_path])


def test_study_diagnostics_read_every_model_once(pair, tmp_path, monkeypatch):
    """The study diffs final models and checkpoints in one pass; a method's final model is its
    trajectory's last point, and its twin checkpoint at the final step is never read."""
    import posttrain.analysis.diff as diff_mod
    from posttrain.config import StudyConfig, TrainConfig
    from posttrain.study import Run, Stages, weight_diagnostics

    base, ft, _ = pair
    run = Run(tmp_path / "run")
    model, _ = load_model(ft)
    w = model.model.layers[1].self_attn.q_proj.weight
    dirs = {}
    with torch.no_grad():
        for name in ("sft", "grpo"):
            for step in (2, 4):
                w.mul_(1.2)
                model.save_pretrained(run.method(name) / "checkpoints" / f"step-{step}", safe_serialization=True)
            model.save_pretrained(run.model(name), safe_serialization=True)
            dirs[name] = run.model(name)
    cfg = StudyConfig(methods={"sft": TrainConfig(objective="sft", steps=4), "grpo": TrainConfig(objective="grpo", steps=4)})
    calls = []
    real = diff_mod.diff

    def counting(base_dir, others, *a, **kw):
        calls.append(dict(others))
        return real(base_dir, others, *a, **kw)

    monkeypatch.setattr(diff_mod, "diff", counting)
    summaries, extra = weight_diagnostics(cfg, run, Stages(run, resume=True), Path(base), dirs,
                                          {"sft": "k1", "grpo": "k2"}, "kb", lambda m: None)
    assert len(calls) == 1
    read = {Path(p).resolve() for p in calls[0].values()}
    assert not {(run.method(n) / "checkpoints" / "step-4").resolve() for n in dirs} & read
    assert {(run.method(n) / "checkpoints" / "step-2").resolve() for n in dirs} <= read
    for name in dirs:
        pts = extra["trajectory"][name]
        assert [p["step"] for p in pts] == [2, 4]
        assert pts[1]["rel_update_total"] == summaries[name]["rel_update_total"] > pts[0]["rel_update_total"]
        assert pts[1]["cosine_prev"] > 0.99
    assert set(extra["pairs"]) == {"sft|grpo"}
    assert (run.root / "diagnostics" / "diff" / "update_cosine_heatmap.png").is_file()
    tj = json.loads((run.root / "diagnostics" / "trajectory" / "trajectory.json").read_text())
    assert [p["step"] for p in tj["runs"]["grpo"]] == [2, 4]


def test_report_plots_from_summaries(planted):
    from posttrain.report import plots as P

    root, *_ = planted
    res = diff(root / "base", {"rot": root / "rot", "other": root / "other"}, spectral=True, show_progress=False)
    js = {k: v.to_json() for k, v in res.summaries.items()}
    nan = lambda xs: np.array([np.nan if x is None else x for x in xs], dtype=float)  # noqa: E731

    # the curves drawn are the summaries' angle curves, per side and model
    fig = P.angle_curves(js)
    for ax, side in zip(fig.axes[:2], ("left", "right")):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert set(lines) == {"rot", "other"}
        for name, ln in lines.items():
            np.testing.assert_allclose(ln.get_xdata(), js[name]["angle_curve"]["x"])
            np.testing.assert_allclose(np.asarray(ln.get_ydata(), dtype=float), nan(js[name]["angle_curve"][side]))
    assert len(js["rot"]["angle_curve"]["left"]) == 20
    # each heatmap cell is the layer x module value of its model (modules in first-seen order)
    heat = lambda key: lambda s: P.layer_module_heatmaps(s, key, key)  # noqa: E731
    for make, key, summaries in ((heat("principal_angle_top_by_layer_module"), "principal_angle_top_by_layer_module", js),
                                 (heat("sv_rel_change_top_by_layer_module"), "sv_rel_change_top_by_layer_module", js),
                                 (P.cosine_heatmaps, "cosine_by_layer_module",
                                  {"rot vs other": res.pairs[("rot", "other")].to_json()})):
        fig = make(summaries)
        images = [ax for ax in fig.axes if ax.get_images()]
        assert [ax.get_title() for ax in images] == list(summaries)
        for ax, name in zip(images, summaries):
            cells = summaries[name][key]
            grid = np.asarray(ax.get_images()[0].get_array(), dtype=float)
            for i, m in enumerate(cells):
                np.testing.assert_allclose(grid[i, : len(cells[m])], nan(cells[m]))
    # one spectrum panel per matrix with spectra, the base drawn once
    fig = P.spectra(js)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == min(6, len(js["rot"]["spectra"]))
    first = panels[0].get_title() + ".weight"
    labels = [ln.get_label() for ln in panels[0].get_lines()]
    assert labels[0] == "base" and sorted(labels[1:]) == sorted(m for m in js if first in js[m]["spectra"])
    np.testing.assert_allclose(panels[0].get_lines()[0].get_ydata(), js["rot"]["spectra"][first]["base"])
    fig = P.trajectories([{"run": "a", "step": 2, "rel_update_total": 0.2, "changed_frac": 0.5},
                          {"run": "a", "step": 1, "rel_update_total": 0.1, "changed_frac": 0.4}])
    (ln,) = fig.axes[0].get_lines()
    assert list(ln.get_xdata()) == [1, 2] and list(ln.get_ydata()) == [0.1, 0.2]
    assert P.to_png(fig)[:4] == b"\x89PNG"


def test_cli_spectral_diff_and_errors(planted, tmp_path):
    import os
    import subprocess
    import sys

    root, *_ = planted

    def cli(*args):
        env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1"}
        return subprocess.run([sys.executable, "-m", "posttrain.cli", "diff", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=300)

    r = cli(root / "base", root / "rot", root / "other", "--out", tmp_path / "d", "--spectral", "--pair", "rot:other")
    assert r.returncode == 0, r.stderr
    assert "top-k principal angle" in r.stdout and "rot vs other: cosine" in r.stdout
    js = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert set(js["models"]) == {"rot", "other"} and "rot|other" in js["pairs"]
    assert js["models"]["rot"]["principal_angle_top"] > 0
    r = cli(root / "base", root / "rot", "--out", tmp_path / "e", "--pair", "rot")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --pair expects A:B (two model names), got 'rot'"]
    assert not (tmp_path / "e").exists()


def test_float32_tall_matrices_take_the_gram_route_with_the_same_answers(tmp_path):
    """Above 2^18 entries "auto" computes in float32 precision; elongated matrices then go through their
    float64 Gram matrices instead of two float32 SVDs. The planted rotation and scaling must come out
    the same either way (to the float32 rounding of the stored weights)."""
    U, V = _orth(1100, 256, 21), _orth(256, 256, 22)
    s = torch.cat([torch.linspace(10.0, 8.0, 13), torch.linspace(2.0, 1.0, 243)]).double()  # gap after k = 13
    f = torch.ones(256, dtype=torch.float64)
    f[:13] = 1.1
    name = "model.layers.0.mlp.up_proj.weight"
    for d, W in (("base", U @ torch.diag(s) @ V.T),
                 ("ft", _turn(U, 0, _outside(U, 23), THETA_Q) @ torch.diag(s * f) @ V.T)):
        (tmp_path / d).mkdir()
        save_file({name: W.float().contiguous()}, str(tmp_path / d / "model.safetensors"))
    b, t = Checkpoint(tmp_path / "base"), Checkpoint(tmp_path / "ft")
    rows = {key: scan(b, {"ft": t}, [name], DiffOptions(spectral=True, svd=svd, svd_dtype=dt)).rows["ft"][0]
            for key, svd, dt in (("auto", "auto", "auto"), ("full32", "full", "auto"), ("full64", "full", "float64"))}
    assert rows["auto"]["svd"] == "gram" and rows["full32"]["svd"] == "full"
    for r in rows.values():
        assert r["k"] == 13
        assert r["angle_top_max_left"] == pytest.approx(THETA_Q * DEG, abs=1e-3)
        assert r["angle_top_right"] == pytest.approx(0, abs=1e-3)
        assert r["sv_rel_change_top"] == pytest.approx(0.1, abs=1e-5)
        assert r["sv_rel_change_bottom"] == pytest.approx(0, abs=1e-5)
    # against float64 SVDs the Gram route is closer than float32 SVDs are
    for col in ("angle_top_left", "angle_bottom_left", "angle_bottom_right", "energy_rotation", "energy_magnitude",
                "energy_rotation_in_span", "alpha_base",
                "stable_rank_delta", "effective_rank_delta", "sv_rel_change_all"):
        assert rows["auto"][col] == pytest.approx(rows["full64"][col], rel=1e-5, abs=1e-4)
        assert rows["full32"][col] == pytest.approx(rows["full64"][col], rel=1e-3, abs=1e-3)


def _perturbed(src, dst, change, seed=0):
    """A copy of checkpoint `src` at `dst` whose layer matrices are `change(W, generator)`."""
    model, tok = load_model(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in n:
                p.copy_(change(p.detach().double(), g).to(p.dtype))
    model.save_pretrained(dst, safe_serialization=True)
    tok.save_pretrained(dst)
    return dst


def _rotate_top(W, g):
    """Turn the top left singular vector 0.3 rad toward the 5th and grow s_1 by 0.1%: mostly a rotation."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U = U.clone()
    u0, u4 = U[:, 0].clone(), U[:, 4].clone()
    U[:, 0], U[:, 4] = math.cos(0.3) * u0 + math.sin(0.3) * u4, -math.sin(0.3) * u0 + math.cos(0.3) * u4
    S = S.clone()
    S[0] *= 1.001
    return (U * S) @ Vh


def test_isotropic_noise_does_not_pass_the_rotation_rule_and_a_rotation_does(tiny_checkpoint, tmp_path):
    """sft_rotates_not_rescales against its null, from real diffs: an SFT update that is itself isotropic
    Gaussian noise (another draw than the null's) must not hold, as it did by 30-60x before the null;
    a planted rotation of the top singular vectors must."""
    from types import SimpleNamespace

    from posttrain.findings import decide
    from posttrain.findings.spectra import sft_rotates_not_rescales

    def noise(W, g):
        return W + 0.02 * W.norm() / math.sqrt(W.numel()) * torch.randn(W.shape, generator=g, dtype=W.dtype)

    others = {"iso": _perturbed(tiny_checkpoint, tmp_path / "iso", noise, seed=123),
              "rot": _perturbed(tiny_checkpoint, tmp_path / "rot", _rotate_top)}
    res = diff(tiny_checkpoint, others, plots=False, show_progress=False, spectral=True, compare_pairs=None,
               null_seed=0)
    verdicts = {}
    for name in others:
        d = res.summaries[name].to_json()
        if name == "iso":  # the null's updates have the noise's norm: top-k angles of the same size
            assert d["null_principal_angle_top"] == pytest.approx(d["principal_angle_top"], rel=0.5)
        m = sft_rotates_not_rescales(SimpleNamespace(sft=name, rl=None, diagnostics={name: d}))
        verdicts[name] = decide(m.value, m.threshold, m.se)
        assert "random updates of the same norm" in m.evidence
    assert verdicts["iso"] is not True and verdicts["rot"] is True
    # the same seed draws the same null; another seed another one
    again = diff(tiny_checkpoint, {"iso": others["iso"]}, plots=False, show_progress=False, spectral=True,
                 compare_pairs=None, null_seed=0).summaries["iso"].to_json()
    other = diff(tiny_checkpoint, {"iso": others["iso"]}, plots=False, show_progress=False, spectral=True,
                 compare_pairs=None, null_seed=1).summaries["iso"].to_json()
    first = res.summaries["iso"].to_json()
    assert again["null_sv_rel_change_top_d0"] == first["null_sv_rel_change_top_d0"]
    assert other["null_sv_rel_change_top_d0"] != first["null_sv_rel_change_top_d0"]


def test_update_energy_cells_match_numpy_and_scale_out_of_the_mlp_share(pair, tmp_path):
    """update_sq = sum ||dW||_F^2 per layer x module cell; sft_moves_mlp_more's share of it is the
    same for an update 6x larger (Adam's update scales with the learning rate)."""
    from posttrain.findings.weights import mid_layer_mlp_share

    base, ft, _ = pair
    summary, _ = relative_updates(base, ft)
    a, b, _ = numpy_rel(base, ft)
    sq = {n: float(np.sum((b[n].astype(np.float64) - a[n].astype(np.float64)) ** 2)) for n in a}
    cells = summary.to_json()["update_sq_by_layer_module"]
    assert cells["down_proj"][0] == pytest.approx(sq["model.layers.0.mlp.down_proj.weight"], rel=1e-9)
    assert cells["q_proj"][1] == pytest.approx(sq["model.layers.1.self_attn.q_proj.weight"], rel=1e-9)
    assert summary.to_json()["update_sq"] == pytest.approx(sum(sq.values()), rel=1e-9)
    # ft + 5 dW: the same update 6x larger
    model, tok = load_model(ft)
    ref, _ = load_model(base)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            p.add_(5 * (p - q))
    model.save_pretrained(tmp_path / "x6", safe_serialization=True)
    tok.save_pretrained(tmp_path / "x6")
    big = relative_updates(base, tmp_path / "x6")[0].to_json()
    assert big["update_sq_by_layer_module"]["down_proj"][0] == pytest.approx(36 * cells["down_proj"][0], rel=1e-5)
    share = mid_layer_mlp_share(summary.to_json())
    assert share is not None and 0 < share < 1
    assert mid_layer_mlp_share(big) == pytest.approx(share, rel=1e-5)


def test_qk_rule_does_not_depend_on_a_modules_weight_scale(pair, tmp_path):
    """qk_change_most ranks modules by ||dW|| / ||W_base||: scaling down_proj's base weights and its
    update together by 100 (a module with larger weights that moved more in absolute terms, now
    more than q_proj) leaves every relative update and the verdict (q_proj on top) as they were."""
    from types import SimpleNamespace

    from posttrain.findings.weights import qk_change_most

    base, ft, _ = pair
    scaled = {}
    for tag, src in (("base", base), ("ft", ft)):
        model, tok = load_model(src)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".down_proj." in n:
                    p.mul_(100.0)
        model.save_pretrained(tmp_path / tag, safe_serialization=True)
        tok.save_pretrained(tmp_path / tag)
        scaled[tag] = tmp_path / tag
    plain = relative_updates(base, ft)[0].to_json()
    big = relative_updates(scaled["base"], scaled["ft"])[0].to_json()
    assert big["rel_update_by_module"] == pytest.approx(plain["rel_update_by_module"], rel=1e-5)
    # in absolute terms down_proj now moved most: a rule on ||dW|| would name it
    energy = {m: sum(x for x in v if x is not None) for m, v in big["update_sq_by_layer_module"].items()}
    assert max(energy, key=energy.get) == "down_proj"

    def verdict(d):
        return qk_change_most(SimpleNamespace(sft="m", rl=None, diagnostics={"m": d}))

    assert verdict(plain)[0] is True and verdict(big) == verdict(plain)


def test_the_null_comparison_set_leaves_out_gram_route_matrices(tmp_path):
    """Matrices analysed through their Gram matrix get no random-update null, so the model's own
    ratio that sft_rotates_not_rescales compares with the null must be over the other matrices only:
    `null_set_*` are the SVD-route matrix's own values, not the model-wide means."""
    from posttrain.analysis.updates import summarise

    g = torch.Generator().manual_seed(5)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (40, 40), "model.layers.0.mlp.up_proj.weight": (120, 40)}
    base = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    ft = {n: w + 0.05 * torch.randn(w.shape, generator=g, dtype=torch.float64) for n, w in base.items()}
    ft["model.layers.0.mlp.up_proj.weight"] = 1.3 * base["model.layers.0.mlp.up_proj.weight"]  # a pure rescaling
    for d, sd in (("base", base), ("ft", ft)):
        (tmp_path / d).mkdir()
        save_file(sd, str(tmp_path / d / "model.safetensors"))
    opts = DiffOptions(spectral=True, gram_min_numel=1, gram_min_aspect=2.0, null_seed=0)
    rows = pd.DataFrame(scan(Checkpoint(tmp_path / "base"), {"ft": Checkpoint(tmp_path / "ft")}, list(shapes),
                             opts).rows["ft"])
    by = rows.set_index("name")
    q, up = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert (by.loc[q, "svd"], by.loc[up, "svd"]) == ("full", "gram")
    assert not math.isnan(by.loc[q, "null_angle_top_left"]) and math.isnan(by.loc[up, "null_angle_top_left"])
    s = summarise(rows, n_layers=1).to_json()
    assert (s["null_set_matrices"], s["angle_matrices"]) == (1, 2)
    q_angle = (by.loc[q, "angle_top_left"] + by.loc[q, "angle_top_right"]) / 2
    assert s["null_set_principal_angle_top"] == pytest.approx(q_angle, rel=1e-12)
    assert s["null_set_sv_rel_change_top"] == pytest.approx(by.loc[q, "sv_rel_change_top"], rel=1e-12)
    # the model-wide means include the rescaled matrix (no rotation, a 30% s.v. change): a ratio far below q's
    assert s["sv_rel_change_top"] == pytest.approx((by.loc[q, "sv_rel_change_top"] + 0.3) / 2, rel=1e-6)
    assert s["principal_angle_top"] < q_angle
