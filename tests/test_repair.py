"""Repairs: UV-merge math on planted spectra, layer reset, interpolation, the streamed checkpoint
writer (sharding, reload), the CLI's errors, and recovery sweeps with a fake evaluator."""

import json
import math
import re

import pytest
import torch
from safetensors import safe_open

from posttrain.analysis.checkpoints import Checkpoint, classify
from posttrain.errors import UserError
from posttrain.repair import get_repair, write_repair
from posttrain.repair.base import layers_from_frac, parse_layers
from posttrain.repair.interpolate import interpolate_tensor, task_arithmetic_tensor
from posttrain.repair.safetensors_stream import StreamWriter
from posttrain.repair.sweep import expand_grid, run_repair_sweep
from posttrain.repair.uv_merge import base_mask, spectrum_counts, uv_merge_matrix


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny SVDs gain nothing from threads, and on a busy 2-core box OpenMP spinning makes them ~1000x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# pure math


def orthonormal(n, k, gen):
    q, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen))
    return q


def block_rotation(r, idx, gen):
    """An r x r orthogonal matrix that mixes only the coordinates in `idx` among themselves."""
    o = torch.eye(r, dtype=torch.float64)
    idx = torch.tensor(idx)
    o[idx.unsqueeze(1), idx.unsqueeze(0)] = orthonormal(len(idx), len(idx), gen)
    return o


def test_spectrum_counts_round_half_up():
    assert spectrum_counts(32, 0.05, 0.0) == (2, 0)  # 1.6 -> 2
    assert spectrum_counts(32, 0.2, 0.05) == (6, 2)  # 6.4 -> 6, 1.6 -> 2
    assert spectrum_counts(10, 0.25, 0.35) == (3, 4)  # 2.5 -> 3, 3.5 -> 4 (half up, not to even)
    assert spectrum_counts(8, 1.0, 0.0) == (8, 0)
    m = base_mask(8, 0.25, 0.125)
    assert m.tolist() == [True, True, False, False, False, False, False, True]
    assert base_mask(4, 0.75, 0.75).all()  # overlapping ends: the union


def test_uv_merge_matches_formula_on_planted_spectra():
    """Base and target share the split of the spectrum into B = {0, 1, 7} and R, but rotate the
    singular vectors inside each block, so every mode has a closed form."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 12, 8, 8
    B, R = [0, 1, 7], [2, 3, 4, 5, 6]
    ub, vb = orthonormal(m, r, g), orthonormal(n, r, g)
    sb = torch.tensor([9.0, 7.0, 5.5, 4.5, 3.5, 2.5, 1.5, 0.5], dtype=torch.float64)
    st = torch.tensor([8.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.25], dtype=torch.float64)
    rot_u = block_rotation(r, B, g) @ block_rotation(r, R, g)
    rot_v = block_rotation(r, B, g) @ block_rotation(r, R, g)
    ut, vt = ub @ rot_u, vb @ rot_v
    wb, wt = (ub * sb) @ vb.T, (ut * st) @ vt.T

    def compose(u_src, v_src, s):
        return sum(s[i] * torch.outer(u_src[i][:, i], v_src[i][:, i]) for i in range(r))

    us_b = {i: (ub if i in B else ut) for i in range(r)}
    vs_b = {i: (vb if i in B else vt) for i in range(r)}
    s_mix = torch.where(torch.tensor([i in B for i in range(r)]), sb, st)
    expected = {
        "full": compose(us_b, vs_b, s_mix),
        "direction": compose(us_b, vs_b, st),
        "magnitude": compose({i: ut for i in range(r)}, {i: vt for i in range(r)}, s_mix),
    }
    for mode, want in expected.items():
        # the blocks rotate only within themselves, so the mixed bases are orthonormal and both operators agree
        for ortho in ((False, True) if mode != "magnitude" else (False,)):
            got = uv_merge_matrix(wb, wt, top=0.25, bottom=0.125, mode=mode, orthonormalize=ortho)
            assert torch.allclose(got, want, atol=1e-10), (mode, ortho)
    # the three modes really differ on this case (a test that cannot confuse them)
    assert (expected["full"] - expected["direction"]).abs().max() > 0.1
    assert (expected["full"] - expected["magnitude"]).abs().max() > 0.1


def random_pair(m=24, n=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    wb = torch.randn(m, n, generator=g) / math.sqrt(n)
    wt = wb + 0.3 * torch.randn(m, n, generator=g) / math.sqrt(n)
    return wb.to(dtype), wt.to(dtype)


def test_uv_merge_endpoints_are_exact():
    wb, wt = random_pair()
    assert torch.equal(uv_merge_matrix(wb, wt, top=1.0, mode="full"), wb)
    assert torch.equal(uv_merge_matrix(wb, wt, top=0.5, bottom=0.5, mode="full"), wb)
    for mode in ("full", "direction", "magnitude"):
        assert torch.equal(uv_merge_matrix(wb, wt, top=0.0, bottom=0.0, mode=mode), wt)
    # through the SVD path: merging a matrix with itself gives it back to float32 rounding
    for mode in ("full", "direction", "magnitude"):
        got = uv_merge_matrix(wt, wt, top=0.3, bottom=0.1, mode=mode)
        assert got.dtype == torch.float32
        assert (got - wt).abs().max() <= 8 * torch.finfo(torch.float32).eps * wt.abs().max(), mode


def test_direction_only_keeps_target_spectrum_and_restores_base_directions():
    """The QR variant (orthonormalize=True); the published operator is tested in test_repair_reference.py."""
    wb, wt = random_pair()
    got = uv_merge_matrix(wb, wt, top=0.25, bottom=0.1, mode="direction", orthonormalize=True)
    assert torch.allclose(torch.linalg.svdvals(got), torch.linalg.svdvals(wt), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, wt, atol=1e-3)
    # every restored triplet is exactly the base's direction with the target's magnitude: W v_b,i = s_t,i u_b,i
    ub, _, vhb = torch.linalg.svd(wb.double(), full_matrices=False)
    st = torch.linalg.svdvals(wt.double())
    for i in torch.nonzero(base_mask(16, 0.25, 0.1)).flatten().tolist():
        assert torch.allclose(got.double() @ vhb[i], st[i] * ub[:, i], atol=1e-5)
    # direction-only with the whole spectrum = U_b diag(s_t) V_bᵀ
    whole = uv_merge_matrix(wb, wt, top=1.0, mode="direction", orthonormalize=True).double()
    assert torch.allclose(whole, (ub * st) @ vhb, atol=1e-5)


def test_magnitude_only_keeps_target_singular_vectors():
    wb, wt = random_pair(seed=1)
    got = uv_merge_matrix(wb, wt, top=0.25, bottom=0.1, mode="magnitude").double()
    ut, st, vht = torch.linalg.svd(wt.double(), full_matrices=False)
    sb = torch.linalg.svdvals(wb.double())
    c = ut.T @ got @ vht.T  # the result in the target's singular bases: must be diagonal
    off = c - torch.diag(torch.diagonal(c))
    assert off.abs().max() < 1e-5
    want = torch.where(base_mask(16, 0.25, 0.1), sb, st)
    assert torch.allclose(torch.diagonal(c), want, atol=1e-5)
    assert not torch.allclose(want, st, atol=1e-3)


def test_uv_merge_bf16_and_bad_input():
    wb, wt = random_pair(dtype=torch.bfloat16)
    got = uv_merge_matrix(wb, wt, top=0.2, mode="direction")
    assert got.dtype == torch.bfloat16 and got.shape == wt.shape and torch.isfinite(got.float()).all()
    with pytest.raises(ValueError, match="top must be in"):
        uv_merge_matrix(wb, wt, top=1.5)
    with pytest.raises(ValueError, match="equal shape"):
        uv_merge_matrix(wb, wt.T, top=0.2)
    with pytest.raises(ValueError, match="mode"):
        uv_merge_matrix(wb, wt, top=0.2, mode="angles")


def test_interpolation_and_task_arithmetic_formulas():
    wb, wt = random_pair()
    assert torch.equal(interpolate_tensor(wb, wt, 0.0), wb)
    assert torch.equal(interpolate_tensor(wb, wt, 1.0), wt)
    assert torch.allclose(interpolate_tensor(wb, wt, 0.3), 0.7 * wb + 0.3 * wt, atol=1e-6)
    w2 = wb - 0.1
    got = task_arithmetic_tensor(wb, [wt, w2], [0.5, -2.0])
    assert torch.allclose(got, wb + 0.5 * (wt - wb) - 2.0 * (w2 - wb), atol=1e-6)


def test_layer_specs():
    assert parse_layers("0:3", 4) == [0, 1, 2]
    assert parse_layers("0:2,3", 4) == [0, 1, 3]
    assert parse_layers("2:", 4) == [2, 3]
    assert parse_layers("1", 4) == [1]
    for bad, match in [("0:6", "beyond the model"), ("4", "beyond"), ("3:1", "empty range"), ("a:b", "cannot parse")]:
        with pytest.raises(UserError, match=match):
            parse_layers(bad, 4)
    assert layers_from_frac(0.25, 4, last=False) == [0]
    assert layers_from_frac(0.5, 4, last=True) == [2, 3]
    assert layers_from_frac(0.1, 4, last=False) == [0]  # any positive fraction resets at least one layer
    assert layers_from_frac(0.0, 4, last=False) == []


def test_stream_writer_roundtrip(tmp_path):
    tensors = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.tensor([True, False, True]), "d": torch.randn(2, 2, dtype=torch.float64),
               "e": torch.tensor(1.5)}
    names = {torch.bfloat16: "BF16", torch.int64: "I64", torch.bool: "BOOL", torch.float64: "F64", torch.float32: "F32"}
    w = StreamWriter(tmp_path / "x.safetensors", [(k, names[v.dtype], tuple(v.shape)) for k, v in tensors.items()],
                     {"format": "pt"})
    assert w.order[0] in ("b", "d")  # 8-byte types first keeps every tensor aligned
    for k in w.order:
        w.write(k, tensors[k])
    w.close()
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)


# ------------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory):
    """base = the tiny checkpoint; target = every parameter perturbed (single file and sharded);
    other = a 3-layer model of the same family (an architecture mismatch)."""
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model, save_checkpoint
    from posttrain.models.tiny import build_tiny_model

    model, tok = load_model(tiny_checkpoint)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("repair")
    model.save_pretrained(root / "target", safe_serialization=True)
    tok.save_pretrained(root / "target")
    model.save_pretrained(root / "target_sharded", safe_serialization=True, max_shard_size="20KB")
    tok.save_pretrained(root / "target_sharded")
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, max_length=96)
    other = build_tiny_model(cfg, len(tok), seed=0)
    save_checkpoint(other, tok, root / "other")
    return {"base": tiny_checkpoint, "target": root / "target", "sharded": root / "target_sharded",
            "other": root / "other"}


def tensors(path):
    ck = Checkpoint(path)
    return {n: ck.get(n) for n in ck.names()}


def test_uv_merge_checkpoint_endpoints(models, tmp_path):
    base, target = tensors(models["base"]), tensors(models["target"])
    rec = write_repair(get_repair("uv_merge", top=1.0), models["base"], [models["target"]], tmp_path / "top1")
    out = tensors(tmp_path / "top1")
    assert set(out) == set(target)
    for n, w in out.items():
        # full mode with the whole spectrum is the base, bit for bit (float32); vectors stay the target's
        assert torch.equal(w, base[n] if w.ndim == 2 else target[n]), n
    assert rec["n_tensors"]["repaired"] == sum(w.ndim == 2 for w in out.values())
    write_repair(get_repair("uv_merge", top=0.0), models["base"], [models["target"]], tmp_path / "top0")
    for n, w in tensors(tmp_path / "top0").items():
        assert torch.equal(w, target[n]), n


def test_uv_merge_checkpoint_direction_and_magnitude(models, tmp_path):
    base, target = tensors(models["base"]), tensors(models["target"])
    write_repair(get_repair("uv_merge", top=0.2, bottom=0.05, mode="direction", orthonormalize=True), models["base"],
                 [models["target"]], tmp_path / "dir")
    changed = 0
    for n, w in tensors(tmp_path / "dir").items():
        if w.ndim == 2:
            assert torch.allclose(torch.linalg.svdvals(w.double()), torch.linalg.svdvals(target[n].double()),
                                  rtol=1e-5, atol=1e-5), n
            changed += not torch.equal(w, target[n])
        else:
            assert torch.equal(w, target[n]), n
    assert changed == sum(w.ndim == 2 for w in target.values())
    write_repair(get_repair("uv_merge", top=1.0, mode="magnitude", modules="q_proj"), models["base"],
                 [models["target"]], tmp_path / "mag")
    out = tensors(tmp_path / "mag")
    for n, w in out.items():
        if classify(n).module != "q_proj":
            assert torch.equal(w, target[n]), n
            continue
        ut, _, vht = torch.linalg.svd(target[n].double())
        c = ut.T @ w.double() @ vht.T
        assert torch.allclose(c, torch.diag(torch.linalg.svdvals(base[n].double())), atol=1e-5), n


def test_reset_layers_changes_exactly_the_named_layers(models, tmp_path):
    base, target = tensors(models["base"]), tensors(models["target"])
    cases = {  # scope "layers": whole layers; the reference scope is tested in test_repair_reference.py
        "l1": (dict(layers="1"), lambda i: i.layer == 1),
        "first": (dict(first_frac=0.5), lambda i: i.layer == 0),
        "emb_head": (dict(layers="0", embeddings=True, head=True),
                     lambda i: i.layer == 0 or (i.layer is None and i.module in ("embed", "lm_head", "norm"))),
        "attn_only": (dict(last_frac=0.5, modules="q_proj,k_proj"),
                      lambda i: i.layer == 1 and i.module in ("q_proj", "k_proj")),
    }
    for name, (params, expect_base) in cases.items():
        write_repair(get_repair("reset_layers", scope="layers", **params), models["base"], [models["target"]],
                     tmp_path / name)
        out = tensors(tmp_path / name)
        n_base = 0
        for n, w in out.items():
            from_base = expect_base(classify(n))
            assert torch.equal(w, base[n] if from_base else target[n]), (name, n)
            n_base += from_base
        assert 0 < n_base < len(out), name
    with pytest.raises(UserError, match="say what to reset"):
        get_repair("reset_layers", scope="layers")


def test_interpolation_checkpoint_endpoints(models, tmp_path):
    base, target = tensors(models["base"]), tensors(models["target"])
    for alpha, want in ((0.0, base), (1.0, target)):
        write_repair(get_repair("interpolate", alpha=alpha), models["base"], [models["target"]], tmp_path / str(alpha))
        for n, w in tensors(tmp_path / str(alpha)).items():
            assert torch.equal(w, want[n]), (alpha, n)
    write_repair(get_repair("interpolate", alpha=0.25), models["base"], [models["target"]], tmp_path / "mid")
    for n, w in tensors(tmp_path / "mid").items():
        assert torch.allclose(w, 0.75 * base[n] + 0.25 * target[n], atol=1e-6), n


def test_sharded_input_gives_same_sharding_and_reloads(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = models["sharded"]
    write_repair(get_repair("uv_merge", top=0.2, mode="direction"), models["base"], [src], tmp_path / "out")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index == json.loads((src / "model.safetensors.index.json").read_text())
    assert {f.name for f in out.glob("*.safetensors")} == {f.name for f in src.glob("*.safetensors")}
    assert len(list(out.glob("*.safetensors"))) > 1
    assert {k: sorted(v) for k, v in Checkpoint(out).shards().items()} == \
        {k: sorted(v) for k, v in Checkpoint(src).shards().items()}
    for f in ("config.json", "tokenizer.json", "generation_config.json", "repair.json"):
        assert (out / f).is_file(), f
    rec = json.loads((out / "repair.json").read_text())
    assert rec["method"] == "uv_merge" and rec["params"]["top"] == 0.2 and rec["params"]["mode"] == "direction"
    # both the sharded and a single-file output load with transformers and give finite logits
    write_repair(get_repair("reset_layers", layers="0"), models["base"], [models["target"]], tmp_path / "single")
    for path in (out, tmp_path / "single"):
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("1+2=3", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
        sd = model.state_dict()
        for n, w in tensors(path).items():
            assert torch.equal(sd[n], w), n


def test_task_arithmetic_checkpoint(models, tmp_path):
    base, target = tensors(models["base"]), tensors(models["target"])
    rec = write_repair(get_repair("task_arithmetic", lambdas=[0.5, 0.25]), models["base"],
                       [models["target"], models["sharded"]], tmp_path / "ta")
    assert rec["targets"][1].endswith("target_sharded")
    for n, w in tensors(tmp_path / "ta").items():
        assert torch.allclose(w, base[n] + 0.75 * (target[n] - base[n]), atol=1e-6), n
    with pytest.raises(UserError, match="3 lambdas for 2 targets"):
        write_repair(get_repair("task_arithmetic", lambdas=[1, 2, 3]), models["base"],
                     [models["target"], models["sharded"]], tmp_path / "ta2")
    with pytest.raises(UserError, match="exactly one target"):
        write_repair(get_repair("interpolate", alpha=0.5), models["base"], [models["target"], models["sharded"]],
                     tmp_path / "ta3")


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_success_and_errors(models, tmp_path, run_cli):
    b, t = models["base"], models["target"]
    out = tmp_path / "out"
    code, stdout, err = run_cli("repair", "uv-merge", "--base", b, "--target", t, "--top", "0.2",
                                "--bottom", "0.05", "--direction-only", "--out", out)
    assert code == 0, err
    assert stdout.strip() == str(out) and (out / "repair.json").is_file()
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    cases = [
        (["uv-merge", "--base", b, "--target", t, "--top", "0.2", "--out", out], "exists; pass --overwrite"),
        (["uv-merge", "--base", b, "--target", t, "--top", "1.5", "--out", tmp_path / "o2"],
         r"top must be in \[0, 1\]"),
        (["uv-merge", "--base", b, "--target", t, "--top", "0.2", "--bottom", "-0.1", "--out", tmp_path / "o2"],
         r"bottom must be in \[0, 1\]"),
        (["reset-layers", "--base", b, "--target", t, "--layers", "0:6", "--out", tmp_path / "o2"],
         "beyond the model, which has 2 layers"),
        (["uv-merge", "--base", models["other"], "--target", t, "--top", "0.2", "--out", tmp_path / "o2"],
         "architecture mismatch"),
        (["interpolate", "--base", b, "--target", t, "--alpha", "0.5", "--out", t], "overlaps the input"),
        (["uv-merge", "--base", b, "--target", t, "--top", "0.2", "--direction-only", "--magnitude-only",
          "--out", tmp_path / "o2"], "exclude each other"),
        (["uv-merge", "--base", b, "--target", t, "--top", "0.2", "--modules", "qproj", "--out", tmp_path / "o2"],
         "unknown module type"),
    ]
    for args, match in cases:
        code, _, err = run_cli("repair", *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert re.search(match, lines[0]), (match, lines[0])
    assert not (tmp_path / "o2").exists()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # the refused write left the old output alone
    code, _, err = run_cli("repair", "reset-layers", "--base", b, "--target", t, "--first-frac",
                           "0.5", "--out", out, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "repair.json").read_text())["method"] == "reset_layers"
    code, _, err = run_cli("repair", "task-arithmetic", "--base", b, "--target", t, "--target",
                           models["sharded"], "--lambda", "0.3", "--out", tmp_path / "ta")
    assert code == 0, err
    assert json.loads((tmp_path / "ta" / "repair.json").read_text())["params"]["lambdas"] == [0.3]
    # one --lambda per --target (the flag was a single float, so a second value could not be given)
    code, _, err = run_cli("repair", "task-arithmetic", "--base", b, "--target", t, "--target",
                           models["sharded"], "--lambda", "0.3", "--lambda", "0.2", "--out", tmp_path / "ta2")
    assert code == 0, err
    assert json.loads((tmp_path / "ta2" / "repair.json").read_text())["params"]["lambdas"] == [0.3, 0.2]


def test_overwrite_refuses_a_directory_that_is_not_a_repair(models, tmp_path):
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a repair output"):
        write_repair(get_repair("interpolate", alpha=0.5), models["base"], [models["target"]], keep, overwrite=True)
    assert (keep / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------
# sweeps

PROBE = "model.layers.0.self_attn.q_proj.weight"


def fake_evaluator(models, calls):
    """Scores from how far the probe weight moved from the damaged model back to the base:
    t = ||P - P_damaged|| / ||P_base - P_damaged|| (0 = damaged, 1 = base); ood = 0.2 + 0.4 t, id = 0.9 - 0.7 t."""
    pb, pd = Checkpoint(models["base"]).get(PROBE).double(), Checkpoint(models["target"]).get(PROBE).double()

    def evaluate(path):
        calls.append(str(path))
        t = float(torch.linalg.norm(Checkpoint(path).get(PROBE).double() - pd) / torch.linalg.norm(pb - pd))
        return {"id_acc": 0.9 - 0.7 * t, "ood_acc": 0.2 + 0.4 * t}

    return evaluate


GRID = [
    {"method": "interpolate", "alpha": [0.25, 0.5]},
    {"method": "reset_layers", "first_frac": 0.5},
    {"method": "reset_layers", "last_frac": 0.5},
    {"method": "uv_merge", "mode": "full", "top": [0.0, 1.0]},
]


def test_sweep_scores_and_cache(models, tmp_path):
    calls = []
    evaluate = fake_evaluator(models, calls)
    res = run_repair_sweep(models["base"], models["target"], models["base"], tmp_path / "rep", GRID, evaluate,
                           eval_key="e1")
    assert list(res) == ["interpolate_alpha-0.25", "interpolate_alpha-0.5", "reset_layers_first_frac-0.5",
                         "reset_layers_last_frac-0.5", "uv_merge_mode-full_top-0", "uv_merge_mode-full_top-1"]
    # with reference = base: ood_recovered = t, id_kept = 1 - t, and t = 1 - alpha for interpolation
    want = {"interpolate_alpha-0.25": 0.75, "interpolate_alpha-0.5": 0.5, "reset_layers_first_frac-0.5": 1.0,
            "reset_layers_last_frac-0.5": 0.0, "uv_merge_mode-full_top-0": 0.0, "uv_merge_mode-full_top-1": 1.0}
    for name, t in want.items():
        e = res[name]
        assert e["ood_recovered_frac"] == pytest.approx(t, abs=1e-6), name
        assert e["id_kept_frac"] == pytest.approx(1 - t, abs=1e-6), name
        assert e["ood_acc"] == pytest.approx(0.2 + 0.4 * t, abs=1e-6) and not e["cached"]
        assert e["ood_gap"] == pytest.approx(0.4) and e["id_gain"] == pytest.approx(0.7)
        assert (tmp_path / "rep" / name / "repair.json").is_file()
    assert res["interpolate_alpha-0.5"]["axis"] == "alpha" and res["interpolate_alpha-0.5"]["x"] == 0.5
    assert res["uv_merge_mode-full_top-1"]["series"] == "uv_merge mode=full"
    assert len(calls) == 2 + len(want)  # base (= reference, evaluated once), damaged, then each repair
    json.dumps(res)  # fits in results.json

    # resume: same grid and eval key -> nothing rewritten, nothing re-evaluated but the anchors
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "rep").rglob("*.safetensors")}
    calls.clear()
    again = run_repair_sweep(models["base"], models["target"], models["base"], tmp_path / "rep", GRID, evaluate,
                             eval_key="e1")
    assert all(e["cached"] for e in again.values()) and len(calls) == 2
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "rep").rglob("*.safetensors")} == mtimes
    assert [v["ood_recovered_frac"] for v in again.values()] == [v["ood_recovered_frac"] for v in res.values()]

    # a repair.json that no longer matches (edited params) is redone; a new eval key re-evaluates
    rec_path = tmp_path / "rep" / "interpolate_alpha-0.5" / "repair.json"
    rec = json.loads(rec_path.read_text())
    rec["params"]["alpha"] = 0.9
    rec_path.write_text(json.dumps(rec))
    calls.clear()
    third = run_repair_sweep(models["base"], models["target"], models["base"], tmp_path / "rep", GRID, evaluate,
                             eval_key="e2")
    assert not third["interpolate_alpha-0.5"]["cached"] and third["interpolate_alpha-0.25"]["cached"]
    assert third["interpolate_alpha-0.5"]["ood_recovered_frac"] == pytest.approx(0.5, abs=1e-6)
    assert len(calls) == 2 + len(want)


def test_sweep_with_given_reference_scores(models, tmp_path):
    calls = []
    anchors = {"reference": {"id_acc": 0.5, "ood_acc": 0.4}}
    res = run_repair_sweep(models["base"], models["target"], models["sharded"], tmp_path / "rep",
                           [{"method": "interpolate", "alpha": 0.5}], fake_evaluator(models, calls), anchors=anchors)
    (e,) = res.values()
    # ood(R) = 0.2 + 0.4 * 0.5 = 0.4, ood(D) = 0.2, ood(REF) = 0.4 -> fully recovered; id kept vs the base's 0.2
    assert e["ood_recovered_frac"] == pytest.approx(1.0, abs=1e-6)
    assert e["id_kept_frac"] == pytest.approx((0.55 - 0.2) / 0.7, abs=1e-6)
    assert len(calls) == 3  # base, damaged, the repair; the reference's scores were given


def test_sweep_recovery_none_when_nothing_to_recover(models, tmp_path):
    res = run_repair_sweep(models["base"], models["target"], models["base"], tmp_path / "rep",
                           [{"method": "interpolate", "alpha": 0.5}], lambda p: {"id_acc": 0.5, "ood_acc": 0.3})
    (e,) = res.values()
    assert e["ood_recovered_frac"] is None and e["id_kept_frac"] is None


@pytest.mark.parametrize("grid,match", [
    ([{"method": "uv_merg", "top": 0.2}], "unknown repair method"),
    ([{"method": "uv_merge", "topp": 0.2}], "unknown parameter"),
    ([{"method": "uv_merge", "top": [0.2, 1.5]}], r"top must be in \[0, 1\]"),
    ([{"method": "uv_merge", "top": []}], "empty list"),
    ([{"method": "uv_merge", "top": 0.2}, {"method": "uv_merge", "top": 0.2}], "both produce"),
    ({"method": "uv_merge"}, "must be a list"),
    ([{"method": "reset_layers", "layers": 124}], "quote it in YAML"),  # what YAML makes of an unquoted 2:4
    ([{"method": "reset_layers", "layers": "0:2", "first_frac": 0.5}], "only one of"),
])
def test_bad_grids(grid, match):
    with pytest.raises(UserError, match=match):
        expand_grid(grid)


def test_sweep_checks_layer_ranges_before_writing(models, tmp_path):
    with pytest.raises(UserError, match="beyond the model"):
        run_repair_sweep(models["base"], models["target"], models["base"], tmp_path / "rep",
                         [{"method": "interpolate", "alpha": 0.5}, {"method": "reset_layers", "layers": "0:5"}],
                         lambda p: {"id_acc": 0.0, "ood_acc": 0.0})
    assert not (tmp_path / "rep").exists()


def test_grid_expansion_names_axes_and_products():
    items = expand_grid([{"name": "uvd", "method": "uv_merge", "mode": "direction", "top": [0.05, 0.2],
                          "bottom": [0.0, 0.05]},
                         {"method": "reset_layers", "last_frac": [0.25, 0.5], "modules": ["q_proj", "k_proj"]},
                         {"method": "task_arithmetic", "lambdas": [[0.5], [1.0]]}])
    names = [it.name for it in items]
    assert names[:4] == ["uvd_top-0.05_bottom-0", "uvd_top-0.05_bottom-0.05", "uvd_top-0.2_bottom-0",
                         "uvd_top-0.2_bottom-0.05"]
    assert {it.axis for it in items[:4]} == {"top"} and [it.x for it in items[:4]] == [0.05, 0.05, 0.2, 0.2]
    assert items[0].series == "uvd mode=direction bottom=0" and items[1].series == "uvd mode=direction bottom=0.05"
    assert items[4].axis == "last_frac" and items[4].params["modules"] == ["q_proj", "k_proj"]
    assert [it.x for it in items[6:]] == [0.5, 1.0] and items[6].axis == "lambdas"
    # a flat list of a list parameter is one value (one lambda per target), not a sweep over it
    one = expand_grid([{"method": "task_arithmetic", "lambdas": [0.5, 0.25]}])
    assert len(one) == 1 and one[0].params["lambdas"] == [0.5, 0.25]


def test_recovery_curves_plot_the_sweep():
    from posttrain.report.plots import recovery_curves, to_png

    repairs = {
        "a1": {"method": "uv_merge", "series": "uv_merge mode=direction", "axis": "top", "x": 0.5,
               "ood_recovered_frac": 0.6, "id_kept_frac": 0.9},
        "a0": {"method": "uv_merge", "series": "uv_merge mode=direction", "axis": "top", "x": 0.1,
               "ood_recovered_frac": 0.2, "id_kept_frac": 1.0},
        "b": {"method": "reset_layers", "series": "reset_layers", "axis": "first_frac", "x": 0.25,
              "ood_recovered_frac": None, "id_kept_frac": 0.4},
        "c": {"method": "reset_layers", "series": "reset_layers layers=0", "axis": "first_frac", "x": None,
              "ood_recovered_frac": 0.3, "id_kept_frac": 0.3},
    }
    fig = recovery_curves(repairs)
    ood_ax, id_ax = fig.axes[:2]
    ood = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ood_ax.get_lines()
           if not line.get_label().startswith("_")}
    idk = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in id_ax.get_lines()
           if not line.get_label().startswith("_")}
    assert ood == {"uv_merge mode=direction  (x = top)": ([0.1, 0.5], [0.2, 0.6])}
    assert idk["reset_layers  (x = first_frac)"] == ([0.25], [0.4])
    assert len(to_png(fig)) > 1000
    assert len(to_png(recovery_curves({}))) > 1000


def test_uv_merge_defaults_dtypes_and_messages():
    wb, wt = random_pair()
    # mode "full" by default: B = everything returns the base, as a copy cast to the target's dtype
    got = uv_merge_matrix(wb.double(), wt, top=1.0)
    assert got.dtype == torch.float32 and torch.equal(got, wb)
    same = uv_merge_matrix(wb, wt, top=1.0)
    assert torch.equal(same, wb) and same.data_ptr() != wb.data_ptr()
    with pytest.raises(ValueError, match=r"^uv_merge: bottom must be in \[0, 1\], got 1.5$"):
        uv_merge_matrix(wb, wt, top=0.2, bottom=1.5)
    with pytest.raises(ValueError, match="^uv_merge: mode must be one of full, direction, magnitude, got 'angles'$"):
        uv_merge_matrix(wb, wt, top=0.2, mode="angles")
    with pytest.raises(ValueError, match=r"^uv_merge: orthonormalize applies to modes full and direction \(magnitude "
                                         r"keeps the target's singular vectors\)$"):
        uv_merge_matrix(wb, wt, top=0.2, mode="magnitude", orthonormalize=True)


def test_svd_dtype_choice():
    from posttrain.repair.uv_merge import AUTO_FLOAT64_MAX_ELEMENTS, svd_dtype_for

    assert AUTO_FLOAT64_MAX_ELEMENTS == 8192 * 8192
    assert svd_dtype_for((8, 8), "float64") == torch.float64 and svd_dtype_for((8, 8), "float32") == torch.float32
    assert svd_dtype_for((8192, 8193), "float64") == torch.float64  # asked for: whatever the size
    # auto: float64 up to 8192 * 8192 elements (counted over every dimension), float32 above
    assert svd_dtype_for((8192, 8192), "auto") == torch.float64
    assert svd_dtype_for((8192, 8193), "auto") == torch.float32
    assert svd_dtype_for((2, 4096, 8193), "auto") == torch.float32 and svd_dtype_for((10, 10), "auto") == torch.float64


def test_uv_merge_repair_passes_its_svd_dtype_and_names_non_finite_inputs():
    wb, wt = random_pair()
    r32 = get_repair("uv_merge", top=0.25, svd_dtype="float32")
    assert torch.equal(r32.apply("w", wb, [wt]), uv_merge_matrix(wb, wt, 0.25, svd_dtype=torch.float32))
    assert not torch.equal(r32.apply("w", wb, [wt]), uv_merge_matrix(wb, wt, 0.25, svd_dtype=torch.float64))
    bad = wb.clone()
    bad[0, 0] = float("nan")
    for args, which in (((bad, [wt]), "base"), ((wb, [bad]), "target")):
        with pytest.raises(UserError, match=f"^uv_merge: w has non-finite values in the {which}; its SVD is undefined$"):
            r32.apply("w", *args)


def test_merge_basis_keeps_unit_columns_when_a_target_column_lies_in_the_base_span():
    from posttrain.repair.uv_merge import _merge_basis

    e = torch.eye(3, dtype=torch.float64)
    # the target's second column is the restored base column itself: QR's diagonal has an exact 0 there
    target = torch.stack([e[:, 0], e[:, 0], e[:, 2]], 1)
    out = _merge_basis(e[:, :1], target, torch.tensor([True, False, False]))
    assert torch.allclose(out.norm(dim=0), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(out.T @ out, torch.eye(3, dtype=torch.float64))


def test_uv_merge_repair_refuses_orthonormalized_magnitude_mode():
    with pytest.raises(UserError, match=r"^uv_merge: orthonormalize applies to modes full and direction \(magnitude "
                                        r"keeps the target's singular vectors\)$"):
        get_repair("uv_merge", top=0.2, mode="magnitude", orthonormalize=True).check()
