"""Unit tests of the checks behind README "Guarantees": one checkpoint-loading path, hub ids,
device names, non-finite repairs, strict JSON, stale temp files, report input, config keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bad_inputs import TENSOR, checkpoint_variants, tiny_checkpoint
from posttrain.errors import UserError


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    good = tiny_checkpoint(root / "good")
    return good, checkpoint_variants(good, root / "ck")


# ------------------------------------------------------------------------------------------------
# one loading path


@pytest.mark.parametrize("name,match", [
    ("truncated", "corrupt or truncated"),
    ("garbage_header_length", "corrupt or truncated"),
    ("garbage_header", "corrupt or truncated"),
    ("renamed_tensor", f"lacks tensor.*{TENSOR}.*unexpected {TENSOR}_renamed"),
    ("extra_tensor", "does not use: model.extra_tensor.weight"),
    ("wrong_shape", rf"{TENSOR} has shape \[32, 10\] but the model's config.json implies \[32, 64\]"),
    ("missing_shard", "shard files listed in the index are missing"),
    ("nan_weights", f"{TENSOR} has non-finite values"),
    ("inf_weights", f"{TENSOR} has non-finite values"),
    ("pickle_only", "only pickle weights.*--allow-pickle"),
    ("bad_config_json", "config.json: not valid JSON"),
    ("no_config", "no config.json"),
    ("bad_tokenizer", "cannot load the tokenizer"),
    ("bad_index", "corrupt index"),
])
def test_load_model_refuses_bad_checkpoints(variants, name, match):
    from posttrain.models.loading import load_model

    _, ck = variants
    with pytest.raises(UserError, match=match) as e:
        load_model(ck[name])
    assert "\n" not in str(e.value)


def test_load_model_reads_pickles_only_when_allowed_and_only_as_tensors(variants):
    from posttrain.analysis.checkpoints import pickle_allowed
    from posttrain.models.loading import load_model

    good, ck = variants
    ref, _ = load_model(good)
    model, _ = load_model(ck["pickle_only"], allow_pickle=True)
    for (n, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
    with pickle_allowed():  # what the CLI's --allow-pickle sets
        load_model(ck["pickle_only"])
    sentinel = ck["malicious_pickle"].parent / "PWNED-malicious_pickle"
    with pytest.raises(UserError, match="refused: not a plain tensor file"):
        load_model(ck["malicious_pickle"], allow_pickle=True)
    assert not sentinel.exists()


def test_load_model_dtypes(variants):
    from posttrain.models.loading import load_model

    good, _ = variants
    assert next(load_model(good, dtype="bf16")[0].parameters()).dtype == torch.bfloat16
    assert next(load_model(good, dtype="auto")[0].parameters()).dtype == torch.float32  # as saved
    with pytest.raises(UserError, match="unknown dtype 'int8'"):
        load_model(good, dtype="int8")


def test_resume_loading_has_the_same_checks(variants, tmp_path):
    from posttrain.models.loading import load_model
    from posttrain.train.checkpointing import load_weights_into

    good, ck = variants
    model, _ = load_model(good)
    for name, match in [("wrong_shape", "has shape"), ("renamed_tensor", "lacks"), ("extra_tensor", "does not use"),
                        ("nan_weights", "non-finite"), ("truncated", "corrupt")]:
        with pytest.raises(UserError, match=match):
            load_weights_into(model, ck[name])


def test_generation_must_fit_the_context(variants):
    from posttrain.models.loading import check_generation_fits, load_model

    model, tok = load_model(variants[0])  # 96 positions
    check_generation_fits(model, tok, ["abc"], 96 - 4, "eval.max_new_tokens")  # <bos> + 3 characters + 92 = 96
    with pytest.raises(UserError, match=r"eval\.max_new_tokens=93: the longest prompt has 4 tokens.*at most 92"):
        check_generation_fits(model, tok, ["abc", "a"], 93, "eval.max_new_tokens")


# ------------------------------------------------------------------------------------------------
# hub ids and devices


def test_missing_local_path_is_not_found_and_hub_ids_fail_fast(tmp_path, monkeypatch):
    from posttrain.models.hub import looks_like_hub_id, resolve_checkpoint

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in (tmp_path / "nope", "./nope/x", "../a/b", "a/b/c", "nope"):
        with pytest.raises(UserError, match="not found") as e:
            resolve_checkpoint(path)
        assert "hub" not in str(e.value).split("(")[0]
    assert looks_like_hub_id("org/name") and looks_like_hub_id("gpt2")
    assert not any(map(looks_like_hub_id, ["/abs/x", "./x", "a/b/c", "a/../b", "x/", "~/m"]))
    with pytest.raises(UserError, match=r"'org/model': .*HF_HUB_OFFLINE.*huggingface-cli download org/model"):
        resolve_checkpoint("org/model")


def test_cached_hub_id_resolves_without_network(tmp_path, monkeypatch, variants):
    """A hub id in the local HF cache is loaded from there (HF_HUB_OFFLINE: any network use would fail)."""
    import shutil

    from posttrain.models.loading import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(variants[0], snap)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    model, _ = load_model("org/tiny")
    assert model.config.hidden_size == 32


def test_hub_id_cli_is_one_line_and_fast_without_network(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "posttrain.cli", "eval", "not-a-dir/model"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not-a-dir/model" in r.stderr and "local copy" in r.stderr


def test_one_device_resolver():
    from posttrain.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    for bad in ("tpu", "gpu", "cuda:x", ""):
        with pytest.raises(UserError, match="unknown device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda:0")


# ------------------------------------------------------------------------------------------------
# repairs never read or write non-finite weights


def test_repairs_refuse_non_finite_inputs_and_outputs(variants, tmp_path):
    from posttrain.repair import get_repair, write_repair

    good, ck = variants
    cases = [
        (get_repair("interpolate", alpha=0.5), good, [ck["nan_weights"]], "non-finite values in the target"),
        (get_repair("interpolate", alpha=1.0), ck["inf_weights"], [good], "non-finite values in the base"),
        (get_repair("task_arithmetic", lambdas=[0.5]), good, [ck["inf_weights"]], "non-finite values in the target"),
        (get_repair("task_arithmetic", lambdas=[1e308]), good, [ck["shifted"]], "output tensor .* non-finite"),
        # an untouched (copied) tensor of the target is checked too
        (get_repair("reset_layers", layers="1"), good, [ck["nan_weights"]], f"{TENSOR} has non-finite"),
    ]
    for i, (repair, base, targets, match) in enumerate(cases):
        with pytest.raises(UserError, match=match):
            write_repair(repair, base, targets, tmp_path / f"r{i}", show_progress=False)
        assert not (tmp_path / f"r{i}").exists() and not list(tmp_path.glob(f".r{i}.*"))
    # a large but finite extrapolation is fine
    rec = write_repair(get_repair("task_arithmetic", lambdas=[3.0]), good, [ck["shifted"]], tmp_path / "ok",
                       show_progress=False)
    assert rec["n_tensors"]["repaired"] > 0


def test_repair_of_a_pickle_checkpoint_writes_safetensors(variants, tmp_path):
    from posttrain.analysis.checkpoints import Checkpoint, pickle_allowed
    from posttrain.repair import get_repair, write_repair

    good, ck = variants
    with pickle_allowed():
        write_repair(get_repair("interpolate", alpha=1.0), good, [ck["pickle_only"]], tmp_path / "r", show_progress=False)
    out, ref = Checkpoint(tmp_path / "r"), Checkpoint(good)
    assert not list((tmp_path / "r").glob("*.bin")) and (tmp_path / "r" / "model.safetensors").is_file()
    assert all(torch.equal(out.get(n), ref.get(n)) for n in ref.names())


# ------------------------------------------------------------------------------------------------
# files


def test_atomic_write_json_is_strict_json(tmp_path):
    import numpy as np

    from posttrain.io import atomic_write_json

    atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf"), np.float32("nan")],
                                             "c": {"d": -float("inf"), "e": 0.5, "f": np.int64(3)}})
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert strict == {"a": None, "b": [1.0, None, None], "c": {"d": None, "e": 0.5, "f": 3}}


def test_trajectory_cosine_of_a_zero_update_is_null(variants, tmp_path):
    """Two checkpoints identical to the base: the update cosine is undefined (was a bare NaN)."""
    import shutil

    from posttrain.analysis.trajectory import trajectory

    good, _ = variants
    for step in (1, 2):
        shutil.copytree(good, tmp_path / "run" / "checkpoints" / f"step-{step}")
    tr = trajectory(good, [tmp_path / "run"], tmp_path / "out", plots=False, show_progress=False)
    assert [p["cosine_prev"] for p in tr.points] == [None, None]
    assert "NaN" not in (tmp_path / "out" / "trajectory.json").read_text()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_of_killed_writers_are_cleaned_and_nothing_else(tmp_path):
    from posttrain.io import atomic_dir, atomic_write_text

    dead, live = _dead_pid(), os.getpid()
    stale = [tmp_path / f".out.{dead}.abcdefgh.tmp", tmp_path / f".scores.json.{dead}.x1y2z3_a.tmp"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"partial")
    stale[1].write_text("{")
    keep = [tmp_path / f".out.{live}.abcdefgh.tmp",  # a live writer's work in progress
            tmp_path / f".other.{dead}.abcdefgh.tmp",  # another output's leftovers: not ours to judge here
            tmp_path / ".out.notes",  # not our pattern
            tmp_path / f".out.{dead}.tmp"]  # not our pattern either
    for k in keep:
        k.write_text("keep")
    with atomic_dir(tmp_path / "out") as d:
        (d / "f").write_text("new")
    atomic_write_text(tmp_path / "scores.json", "{}")
    assert not any(p.exists() for p in stale)
    assert all(k.read_text() == "keep" for k in keep)
    # a writer killed between moving the old version aside and moving the new one in: the old one comes back
    os.replace(tmp_path / "out", tmp_path / f".out.old-{dead}")
    from posttrain.io import clean_stale_temps

    clean_stale_temps(tmp_path / "out")
    assert (tmp_path / "out" / "f").read_text() == "new"


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    from posttrain.train.checkpointing import truncate_metrics

    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 0}\n{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    truncate_metrics(f, 1)
    assert f.read_text() == '{"step": 0}\n{"step": 1, "loss": 1.0}\n'


# ------------------------------------------------------------------------------------------------
# config keys and the report's input


@pytest.mark.parametrize("item", ["methods..lr=1", ".seed=1", "seed.=1", "=1", "methods. .lr=1"])
def test_override_with_an_empty_key_component_is_an_error(item):
    from posttrain.config import build_study_config

    with pytest.raises(UserError, match=f"override key {item.split('=')[0]!r} has an empty component"):
        build_study_config({}, [item])


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", "base", "x\\y"])
def test_method_names_must_be_plain_directory_names(name):
    from posttrain.config import build_study_config

    with pytest.raises(UserError, match="cannot name a method"):
        build_study_config({"methods": {name: {"method": "sft"}}})


def test_max_new_tokens_must_fit_the_tiny_models_context():
    from posttrain.config import build_study_config

    with pytest.raises(UserError, match=r"methods\.grpo\.max_new_tokens=128 does not fit"):
        build_study_config({}, ["methods.grpo.max_new_tokens=128"])


@pytest.mark.parametrize("text,match", [
    ("{", "not valid JSON"), ("[]", "not a JSON object"), ('{"study": "s"}', "invalid results: seed"),
    ('{"study": "s", "seed": 0, "wall_seconds": 1, "id_task": "a", "ood_task": "b", "retention_tasks": [], '
     '"models": {}, "forgetting": {}}', "invalid results: models"),
])
def test_report_refuses_bad_results(tmp_path, text, match):
    from posttrain.report.html import write_report

    (tmp_path / "results.json").write_text(text)
    with pytest.raises(UserError, match=match):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()

