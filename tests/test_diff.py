import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from posttrain.analysis.checkpoints import Checkpoint, classify
from posttrain.analysis.diff import diff
from posttrain.analysis.updates import relative_updates
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


def test_sharded_checkpoint_gives_same_result(pair):
    base, ft, sharded = pair
    assert (sharded / "model.safetensors.index.json").is_file()
    s1, r1 = relative_updates(base, ft)
    s2, r2 = relative_updates(base, sharded)
    assert s1.to_json() == s2.to_json()


def test_diff_writes_outputs(pair, tmp_path):
    base, ft, _ = pair
    res = diff(base, {"ft": ft}, tmp_path / "out", show_progress=False)
    for f in ("diff.json", "tensors.csv", "tensors.parquet", "rel_update_heatmap.png", "rel_update_by_module.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    js = json.loads((tmp_path / "out" / "diff.json").read_text())
    assert js["models"]["ft"]["rel_update_by_module"] == res.summaries["ft"].rel_update_by_module


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


def test_nonfinite_weights_are_reported_not_fatal(pair, tmp_path):
    base, ft, _ = pair
    model, tok = load_model(ft)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan", safe_serialization=True)
    summary, _ = relative_updates(base, tmp_path / "nan")
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
])
def test_classify_names(name, layer, module):
    info = classify(name)
    assert (info.layer, info.module) == (layer, module)
