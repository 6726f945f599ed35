"""The published repair operators (RL_Heals_SFT) against independent transcriptions: UV-merge without
re-orthonormalisation through the CLI, layer reset in the reference's scope, the energy split of
U_b^T dW V_b normalised by ||dW||_F^2, and the noise rule of the recovered fraction and its findings."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from posttrain.analysis.checkpoints import Checkpoint, classify
from posttrain.errors import UserError
from posttrain.repair import get_repair, write_repair
from posttrain.repair.sweep import recovered_frac_se, recovery_scores
from posttrain.repair.uv_merge import uv_merge_matrix


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# the reference formula, transcribed from RL_Heals_SFT analysis/svd_recover_dir.py and svd_recover.py
# (svd_replace_gpu), in float64; k_top / k_tail are counts as in the reference


def reference_svd_replace(Wb, Wt, k_top, k_tail, vector=False):
    Ub, Sb, Vb = torch.linalg.svd(Wb.double(), full_matrices=False)  # Vb is V^T, as torch returns it
    Ut, St, Vt = torch.linalg.svd(Wt.double(), full_matrices=False)
    n = Ub.shape[1]
    k_top = min(k_top, n)
    k_tail = min(k_tail, n - k_top)
    if k_tail == 0 and k_top == 0:
        return Wt.double()
    if k_top + k_tail == n:
        return Wb.double()
    U_new = torch.cat([Ub[:, :k_top], Ut[:, k_top:n - k_tail], Ub[:, n - k_tail:]], dim=1)
    V_new = torch.cat([Vb[:k_top, :], Vt[k_top:n - k_tail, :], Vb[n - k_tail:, :]], dim=0)
    S_new = torch.cat([Sb[:k_top], St[k_top:n - k_tail], Sb[n - k_tail:]])
    return U_new @ torch.diag(S_new if vector else St) @ V_new


def count(frac, r):
    return int(math.floor(frac * r + 0.5))  # "top 20%" of r triplets, rounded half up


def rel_err(got, want):
    return float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want))


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint, tmp_path_factory):
    """base = the tiny checkpoint (untied embeddings and LM head); target = every parameter perturbed
    by 30% of its mean magnitude, enough to turn singular vectors so the two operators differ."""
    from posttrain.models.loading import load_model

    model, tok = load_model(tiny_checkpoint)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("ref")
    model.save_pretrained(root / "target", safe_serialization=True)
    tok.save_pretrained(root / "target")
    return {"base": tiny_checkpoint, "target": root / "target"}


def tensors(path):
    ck = Checkpoint(path)
    return {n: ck.get(n) for n in ck.names()}


def test_cli_no_orthonormalize_is_the_reference_formula(ckpts, tmp_path, run_cli):
    b, t = ckpts["base"], ckpts["target"]
    base, target = tensors(b), tensors(t)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(target)  # untied: both are separate matrices
    code, _, err = run_cli("repair", "uv-merge", "--base", b, "--target", t, "--top", "0.2",
                           "--direction-only", "--no-orthonormalize", "--out", tmp_path / "ref")
    assert code == 0, err
    out = tensors(tmp_path / "ref")
    rec = json.loads((tmp_path / "ref" / "repair.json").read_text())
    assert rec["params"]["orthonormalize"] is False and rec["params"]["mode"] == "direction"
    n_mat = 0
    for n, w in out.items():
        if w.ndim != 2:
            assert torch.equal(w, target[n]), n  # 1-D tensors are the target's
            continue
        r = min(w.shape)
        want = reference_svd_replace(base[n], target[n], count(0.2, r), 0)
        assert rel_err(w, want) < 1e-4, n
        assert rel_err(target[n], want) > 1e-3, n  # every matrix really changed, embeddings and head included
        n_mat += 1
    assert n_mat == sum(w.ndim == 2 for w in target.values()) == len(rec["tensors_repaired"])
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(rec["tensors_repaired"])

    # the default is the reference operator; --orthonormalize selects the QR variant, which differs
    code, _, err = run_cli("repair", "uv-merge", "--base", b, "--target", t, "--top", "0.2",
                           "--direction-only", "--out", tmp_path / "default")
    assert code == 0, err
    assert all(torch.equal(w, out[n]) for n, w in tensors(tmp_path / "default").items())
    code, _, err = run_cli("repair", "uv-merge", "--base", b, "--target", t, "--top", "0.2",
                           "--direction-only", "--orthonormalize", "--out", tmp_path / "qr")
    assert code == 0, err
    qr = tensors(tmp_path / "qr")
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        want_qr = uv_merge_matrix(base[n], target[n], 0.2, mode="direction", orthonormalize=True)
        assert torch.equal(qr[n], want_qr), n
        # QR keeps the target's spectrum exactly; the reference's concatenated bases do not
        assert torch.allclose(torch.linalg.svdvals(qr[n].double()), torch.linalg.svdvals(target[n].double()),
                              rtol=1e-5, atol=1e-5), n
    worst = max(rel_err(qr[n], out[n].double()) for n in out if out[n].ndim == 2)
    assert worst > 1e-3  # the operators differ, so the comparison above could have failed


def test_full_mode_and_the_full_rank_shortcut(ckpts, tmp_path):
    base, target = tensors(ckpts["base"]), tensors(ckpts["target"])
    write_repair(get_repair("uv_merge", top=0.2, bottom=0.05, orthonormalize=False), ckpts["base"],
                 [ckpts["target"]], tmp_path / "full")
    for n, w in tensors(tmp_path / "full").items():
        if w.ndim == 2:
            r = min(w.shape)
            want = reference_svd_replace(base[n], target[n], count(0.2, r), count(0.05, r), vector=True)
            assert rel_err(w, want) < 1e-4, n
    # k_top + k_bot >= r: the source matrix itself, also in direction mode (the reference's shortcut)
    write_repair(get_repair("uv_merge", top=0.6, bottom=0.5, mode="direction"), ckpts["base"], [ckpts["target"]],
                 tmp_path / "all")
    for n, w in tensors(tmp_path / "all").items():
        assert torch.equal(w, base[n] if w.ndim == 2 else target[n]), n


def test_reference_matrix_function_on_wide_and_tall_matrices():
    g = torch.Generator().manual_seed(5)
    for shape in ((20, 12), (12, 20)):
        wb = torch.randn(*shape, generator=g, dtype=torch.float64)
        wt = wb + 0.8 * torch.randn(*shape, generator=g, dtype=torch.float64)
        for mode, vector in (("direction", False), ("full", True)):
            got = uv_merge_matrix(wb, wt, 0.25, 0.1, mode=mode)  # orthonormalize defaults to the reference
            want = reference_svd_replace(wb, wt, count(0.25, 12), count(0.1, 12), vector=vector)
            assert rel_err(got, want) < 1e-10, (shape, mode)
            qr = uv_merge_matrix(wb, wt, 0.25, 0.1, mode=mode, orthonormalize=True)
            assert rel_err(qr, want) > 1e-2, (shape, mode)
    with pytest.raises(ValueError, match="orthonormalize applies"):
        uv_merge_matrix(wb, wt, 0.2, mode="magnitude", orthonormalize=True)


def test_cli_bool_flags_both_ways_and_errors(ckpts, tmp_path, run_cli):
    b, t = ckpts["base"], ckpts["target"]
    import typer

    from posttrain.cli import repair_app

    cmds = typer.main.get_command(repair_app).commands
    flags = {c: {o for p in cmds[c].params for o in (*p.opts, *p.secondary_opts)} for c in ("uv-merge", "reset-layers")}
    assert {"--orthonormalize", "--no-orthonormalize"} <= flags["uv-merge"]
    assert {"--scope", "--embeddings", "--no-embeddings", "--head", "--no-head"} <= flags["reset-layers"]
    code, _, err = run_cli("repair", "uv-merge", "--base", b, "--target", t, "--top", "1",
                           "--magnitude-only", "--orthonormalize", "--out", tmp_path / "x")
    assert code == 2 and err.strip().startswith("error: uv_merge: orthonormalize applies") and len(err.splitlines()) == 1
    code, _, err = run_cli("repair", "reset-layers", "--base", b, "--target", t, "--first-frac",
                           "0.5", "--head", "--out", tmp_path / "x")
    assert code == 2 and "apply to scope 'layers'" in err
    code, _, err = run_cli("repair", "reset-layers", "--base", b, "--target", t, "--scope",
                           "everything", "--first-frac", "0.5", "--out", tmp_path / "x")
    assert code == 2 and "scope" in err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# layer reset in the reference's scope


def test_reset_layers_reference_scope(ckpts, tmp_path, run_cli):
    base, target = tensors(ckpts["base"]), tensors(ckpts["target"])
    code, _, err = run_cli("repair", "reset-layers", "--base", ckpts["base"], "--target",
                           ckpts["target"], "--first-frac", "0.5", "--out", tmp_path / "ref")
    assert code == 0, err
    out = tensors(tmp_path / "ref")
    reset = set()
    for n, w in out.items():
        i = classify(n)
        # layer 0's matrices, the token embeddings and the LM head; norms (layer 0's too) stay the target's
        from_base = (i.layer == 0 and w.ndim == 2) or n in ("model.embed_tokens.weight", "lm_head.weight")
        assert torch.equal(w, base[n] if from_base else target[n]), n
        reset |= {n} if from_base else set()
    assert "model.layers.0.input_layernorm.weight" in out and "model.layers.0.input_layernorm.weight" not in reset
    assert json.loads((tmp_path / "ref" / "repair.json").read_text())["params"]["scope"] == "reference"
    # scope layers: today's behaviour, the whole layer including its norms, no embeddings or head
    write_repair(get_repair("reset_layers", first_frac=0.5, scope="layers"), ckpts["base"], [ckpts["target"]],
                 tmp_path / "layers")
    for n, w in tensors(tmp_path / "layers").items():
        assert torch.equal(w, base[n] if classify(n).layer == 0 else target[n]), n
    with pytest.raises(UserError, match="say which layers"):
        get_repair("reset_layers")
    with pytest.raises(UserError, match="apply to scope 'layers'"):
        get_repair("reset_layers", layers="0", embeddings=True)
    with pytest.raises(UserError, match="say what to reset"):
        get_repair("reset_layers", scope="layers")


def test_reset_layers_reference_scope_with_tied_embeddings(tmp_path):
    from posttrain.config import ModelConfig
    from posttrain.models.loading import save_checkpoint
    from posttrain.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    cfg = ModelConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, max_length=32, tie_embeddings=True)
    for seed in (0, 1):
        save_checkpoint(build_tiny_model(cfg, len(tok), seed=seed), tok, tmp_path / str(seed))
    write_repair(get_repair("reset_layers", layers="1"), tmp_path / "0", [tmp_path / "1"], tmp_path / "out")
    base, target, out = tensors(tmp_path / "0"), tensors(tmp_path / "1"), tensors(tmp_path / "out")
    assert "lm_head.weight" not in out
    for n, w in out.items():
        from_base = (classify(n).layer == 1 and w.ndim == 2) or n == "model.embed_tokens.weight"
        assert torch.equal(w, base[n] if from_base else target[n]), n


# ------------------------------------------------------------------------------------------------
# energy split of dW in the base's singular basis


def test_energy_split_normalisations_by_hand():
    from posttrain.analysis import spectral as sp

    # W_b = [[2, 0], [0, 1], [0, 0]]: U_b = first two columns of I_3, V_b = I_2, so C = the top 2x2 block of dW
    dW = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], dtype=torch.float64)
    c_diag = torch.tensor([0.1, 0.4], dtype=torch.float64)
    c_sq, dw_sq = 0.01 + 0.04 + 0.09 + 0.16, 0.91
    mag, rot = sp.energy_split(c_diag, c_sq, dw_sq)
    assert mag == pytest.approx(0.17 / 0.91) and rot == pytest.approx(0.13 / 0.91)
    assert sp.energy_split_in_span(c_diag, c_sq) == pytest.approx((0.17 / 0.30, 0.13 / 0.30))
    assert float(dW.pow(2).sum()) == pytest.approx(dw_sq)
    assert all(math.isnan(x) for x in sp.energy_split(torch.zeros(2), 0.0, 0.0))


def test_energy_split_in_the_diff_on_non_square_matrices(tmp_path):
    """A 6x4 (tall) and a 4x6 (wide) weight whose base has U_b = first columns of I, V_b = I, so
    C = U_b^T dW V_b is dW's top 4x4 block (or its left block for the wide one), by hand."""
    from posttrain.analysis.diff import diff

    wb = torch.zeros(6, 4, dtype=torch.float64)
    wb[0, 0], wb[1, 1], wb[2, 2], wb[3, 3] = 4.0, 3.0, 2.0, 1.0
    dW = torch.zeros(6, 4, dtype=torch.float64)
    dW[0, 0], dW[1, 1] = 0.2, -0.1           # diagonal of C: 0.04 + 0.01 = 0.05
    dW[0, 1], dW[2, 3] = 0.3, 0.1            # off-diagonal of C: 0.09 + 0.01 = 0.10
    dW[4, 0], dW[5, 2] = 0.4, 0.2            # outside span(U_b): 0.16 + 0.04 = 0.20
    base = {"model.layers.0.mlp.up_proj.weight": wb, "model.layers.0.mlp.down_proj.weight": wb.T.contiguous()}
    ft = {"model.layers.0.mlp.up_proj.weight": wb + dW, "model.layers.0.mlp.down_proj.weight": (wb + dW).T.contiguous()}
    for d, ts in (("base", base), ("ft", ft)):
        (tmp_path / d).mkdir()
        save_file(ts, str(tmp_path / d / "model.safetensors"))
    res = diff(tmp_path / "base", {"ft": tmp_path / "ft"}, tmp_path / "out", spectral=True, show_progress=False)
    t = res.tables["ft"]
    for name in base:
        row = t[t["name"] == name].iloc[0]
        assert row["energy_magnitude"] == pytest.approx(0.05 / 0.35, abs=1e-10), name
        assert row["energy_rotation"] == pytest.approx(0.10 / 0.35, abs=1e-10), name
        assert row["energy_diag_in_span"] == pytest.approx(0.05 / 0.15, abs=1e-10), name
        assert row["energy_rotation_in_span"] == pytest.approx(0.10 / 0.15, abs=1e-10), name
    s = json.loads((tmp_path / "out" / "diff.json").read_text())["models"]["ft"]
    assert s["energy_rotation"] == pytest.approx(0.10 / 0.35, abs=1e-10)
    assert s["energy_magnitude"] == pytest.approx(0.05 / 0.35, abs=1e-10)
    assert s["energy_rotation_in_span"] == pytest.approx(0.10 / 0.15, abs=1e-10)
    assert s["energy_rotation_by_module"]["up_proj"] == pytest.approx(0.10 / 0.35, abs=1e-10)


# ------------------------------------------------------------------------------------------------
# recovered fraction: the noise rule and its standard error


def test_no_recovered_fraction_when_sft_raised_ood():
    base, sft, rep = {"id_acc": 0.2, "ood_acc": 0.30, "ood_n": 200}, {"id_acc": 0.5, "ood_acc": 0.40, "ood_n": 200}, \
        {"id_acc": 0.4, "ood_acc": 0.32, "ood_n": 200}
    s = recovery_scores(rep, sft, base, base)
    # the old formula gave (0.32 - 0.40) / (0.30 - 0.40) = 0.8 "recovered"
    assert s["ood_recovered_frac"] is None and s["ood_recovered_se"] is None
    assert s["ood_gap"] == pytest.approx(-0.10)
    assert s["ood_gap_se"] == pytest.approx(math.sqrt(0.3 * 0.7 / 200 + 0.4 * 0.6 / 200))
    assert s["id_kept_frac"] == pytest.approx(2 / 3)
    # no problem counts: the sign check alone still refuses a negative gap
    assert recovery_scores({"id_acc": 0.4, "ood_acc": 0.32}, {"id_acc": 0.5, "ood_acc": 0.40},
                           {"id_acc": 0.2, "ood_acc": 0.30}, base)["ood_recovered_frac"] is None


def test_recovered_fraction_needs_a_gap_beyond_two_se():
    # one problem of 50: gap 0.02 vs 2 SE = 2 sqrt(.3*.7/50 + .28*.72/50) = 0.181
    s = recovery_scores({"id_acc": 0, "ood_acc": 0.30}, {"id_acc": 0, "ood_acc": 0.28, "ood_n": 50},
                        {"id_acc": 0, "ood_acc": 0.30, "ood_n": 50}, {"id_acc": 0, "ood_acc": 0.30})
    assert s["ood_recovered_frac"] is None and 2 * s["ood_gap_se"] == pytest.approx(0.18149, abs=1e-4)
    # a clear gap: REF 0.5, D 0.1, R 0.38 on 400 problems -> f = 0.7
    s = recovery_scores({"id_acc": 0, "ood_acc": 0.38}, {"id_acc": 0, "ood_acc": 0.10, "ood_n": 400},
                        {"id_acc": 0, "ood_acc": 0.50, "ood_n": 400}, {"id_acc": 0, "ood_acc": 0.5})
    assert s["ood_recovered_frac"] == pytest.approx(0.7)
    # by hand: sqrt(.38*.62/400 + .49*.25/400 + .09*.09/400) / 0.4
    assert s["ood_recovered_se"] == pytest.approx(math.sqrt((0.2356 + 0.1225 + 0.0081) / 400) / 0.4, rel=1e-12)


def test_recovered_frac_se_is_the_delta_method():
    r, d, ref, se = 0.41, 0.12, 0.47, (0.021, 0.017, 0.025)
    f = lambda r, d, ref: (r - d) / (ref - d)  # noqa: E731
    h = 1e-7
    grads = [(f(r + h, d, ref) - f(r - h, d, ref)) / (2 * h), (f(r, d + h, ref) - f(r, d - h, ref)) / (2 * h),
             (f(r, d, ref + h) - f(r, d, ref - h)) / (2 * h)]
    want = math.sqrt(sum((gi * si) ** 2 for gi, si in zip(grads, se)))
    assert recovered_frac_se(r, d, ref, *se) == pytest.approx(want, rel=1e-6)
    assert recovered_frac_se(r, d, ref, None, 0.1, 0.1) is None


def _results(repairs, n_ood=200):
    models = {m: {"id_acc": 0.5, "ood_acc": 0.3, "retention": {}} for m in ("base", "sft", "grpo")}
    return {"models": models, "forgetting": {}, "diagnostics": {}, "repairs": repairs,
            "n_problems": {"id": 200, "ood": n_ood, "retention": {}}}


def _entry(method, params, ood_acc, scores):
    return {"method": method, "params": params, "ood_acc": ood_acc, "id_acc": 0.5, **scores}


REPAIR_FINDINGS = ("uv_top20_recovers_ood", "reset_first_quarter_recovers_ood", "sft_damage_is_rotation")


def _findings(repairs):
    """The repair findings' verdicts (through `evaluate_findings`, with only them registered)."""
    import posttrain.findings as F
    from posttrain.config import load_study_config, preset_path

    only = {k: F.FINDINGS[k] for k in REPAIR_FINDINGS}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "FINDINGS", only)
        return {f["id"]: f for f in F.evaluate_findings(_results(repairs), load_study_config(preset_path("quick")))}


UV_REF = {"mode": "direction", "top": 0.2, "bottom": 0.0, "orthonormalize": False}
UV_QR = {**UV_REF, "orthonormalize": True}
RESET = {"first_frac": 0.25, "scope": "reference"}


def test_findings_cannot_test_when_sft_raised_ood():
    base, sft = {"id_acc": 0.2, "ood_acc": 0.30, "ood_n": 200}, {"id_acc": 0.5, "ood_acc": 0.40, "ood_n": 200}
    reps = {}
    for name, method, params in (("uv", "uv_merge", UV_REF), ("uvqr", "uv_merge", UV_QR), ("reset", "reset_layers", RESET),
                                 ("dir1", "uv_merge", {"mode": "direction", "top": 1.0, "orthonormalize": True}),
                                 ("mag1", "uv_merge", {"mode": "magnitude", "top": 1.0})):
        rep = {"id_acc": 0.4, "ood_acc": 0.32, "ood_n": 200}
        reps[name] = _entry(method, params, 0.32, recovery_scores(rep, sft, base, base))
    f = _findings(reps)
    for fid in REPAIR_FINDINGS:
        assert f[fid]["holds"] is None, fid
        ev = f[fid]["evidence"]
        assert ev.startswith("cannot test: SFT did not lose OOD accuracy (gap to recover -0.100, 2 SE = 0.0"), ev
    assert "QR variant (uvqr): recovered n/a" in f["uv_top20_recovers_ood"]["evidence"]


def test_recovery_findings_follow_the_noise_rule():
    base, sft = {"id_acc": 0.2, "ood_acc": 0.50, "ood_n": 400}, {"id_acc": 0.6, "ood_acc": 0.10, "ood_n": 400}

    def entry(method, params, ood):
        return _entry(method, params, ood, recovery_scores({"id_acc": 0.5, "ood_acc": ood, "ood_n": 400}, sft, base, base))

    # reference operator recovers 97.5% (0.49): beyond 0.7 by far more than 2 SE; the QR number is shown beside it
    reps = {"uv": entry("uv_merge", UV_REF, 0.49), "uvqr": entry("uv_merge", UV_QR, 0.30),
            "reset": entry("reset_layers", RESET, 0.38),  # exactly 70%: within noise
            "dir1": entry("uv_merge", {"mode": "direction", "top": 1.0, "orthonormalize": True}, 0.45),
            "mag1": entry("uv_merge", {"mode": "magnitude", "top": 1.0}, 0.11)}
    f = _findings(reps)
    uv = f["uv_top20_recovers_ood"]
    assert uv["holds"] is True and uv["value"] == pytest.approx(0.975) and uv["threshold"] == 0.7
    assert uv["se"] == pytest.approx(reps["uv"]["ood_recovered_se"]) and uv["se"] > 0
    assert "recovered 98%" in uv["evidence"] and "QR variant (uvqr): recovered 50%" in uv["evidence"]
    assert "Noise rule" in uv["claim"]
    reset = f["reset_first_quarter_recovers_ood"]
    assert reset["holds"] is None and "within noise" in reset["evidence"]
    rot = f["sft_damage_is_rotation"]
    assert rot["holds"] is True and rot["value"] == pytest.approx((0.45 - 0.11) / 0.4)
    # a repair made with the QR operator alone does not stand in for the published one
    f = _findings({"uvqr": reps["uvqr"]})
    assert f["uv_top20_recovers_ood"]["holds"] is None and "no uv_merge repair" in f["uv_top20_recovers_ood"]["evidence"]


def test_default_grid_runs_both_operators_at_the_same_points():
    from posttrain.config import RepairConfig
    from posttrain.repair.sweep import expand_grid

    items = expand_grid(RepairConfig().grid)
    uv = [(it.params["top"], it.params.get("bottom", 0.0), it.params["orthonormalize"]) for it in items
          if it.method == "uv_merge" and it.params["mode"] == "direction"]
    assert {(t, b) for t, b, o in uv if o} == {(t, b) for t, b, o in uv if not o} and len(uv) == 12
    assert (0.2, 0.0, False) in uv and (1.0, 0.0, True) in uv
    resets = [it.params for it in items if it.method == "reset_layers"]
    assert {"first_frac": 0.25, "scope": "reference"} in [{k: p[k] for k in ("first_frac", "scope")} for p in resets]
    # every repair entry records its operator in its parameters
    for it in items:
        r = get_repair(it.method, **it.params)
        if it.method == "uv_merge":
            assert "orthonormalize" in r.params
        if it.method == "reset_layers":
            assert r.params["scope"] in ("reference", "layers")


def test_report_repair_table_names_the_operator():
    from posttrain.report.html import repair_operator, repair_section

    base, sft = {"id_acc": 0.2, "ood_acc": 0.30, "ood_n": 200}, {"id_acc": 0.5, "ood_acc": 0.40, "ood_n": 200}
    reps = {}
    for name, method, params in (("uv", "uv_merge", UV_REF), ("uvqr", "uv_merge", UV_QR), ("reset", "reset_layers", RESET)):
        rep = {"id_acc": 0.4, "ood_acc": 0.32, "ood_n": 200}
        reps[name] = {**_entry(method, params, 0.32, recovery_scores(rep, sft, base, base)), "series": name,
                      "axis": "top", "x": 0.2}
    assert [repair_operator(r) for r in reps.values()] == ["direction, published", "direction, QR", "scope reference"]
    # results written before this change: no orthonormalize (they used QR), no scope (whole layers)
    assert repair_operator({"method": "uv_merge", "params": {"mode": "direction"}}) == "direction, QR"
    assert repair_operator({"method": "reset_layers", "params": {}}) == "scope layers"
    html = repair_section({"repairs": reps})
    assert "direction, published" in html and "scope reference" in html
    assert "not a loss beyond noise" in html and "+10.0 points" not in html and "-10.0 points" in html
