"""The bad-input corpus: every case is generated here, at test time, from one tiny checkpoint.

Nothing binary is checked in. `build_corpus(root)` writes broken checkpoints (truncated, garbage
header length, unparsable header, renamed / extra / wrong-shape tensors, a missing shard, NaN and
inf weights, pickle-only and malicious-pickle weights, bad config.json and tokenizer), bad YAML
configs, bad results.json files and pre-existing outputs under `root`, and returns the CLI cases
that use them. `huge_integer_cases()` are the verifier cases (answers longer than Python's
4300-digit int-conversion limit). tests/test_bad_inputs.py runs them all and checks the
guarantees of README "Guarantees": exit code 2, exactly one line on stderr, starting with
`error: ` and naming the file or key, no traceback, and no pre-existing file changed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TENSOR = "model.layers.0.mlp.down_proj.weight"  # the tensor the checkpoint variants break
HUGE = "9" * 5000  # more digits than int() converts (sys.get_int_max_str_digits() == 4300)


@dataclass
class Case:
    id: str
    argv: list[str]  # after `posttrain`
    expect: str  # regex the error line must match: it names the file or key at fault
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None  # the case's own directory (created by build_corpus)
    # run in a fresh interpreter rather than a fork of one that imported everything already: for
    # environment variables libraries read at import time (HF_HOME), and as a check of the forks
    fresh: bool = False


# ------------------------------------------------------------------------------------------------
# checkpoints


def tiny_checkpoint(path: Path, sharded: bool = False) -> Path:
    from posttrain.config import ModelConfig
    from posttrain.models.tiny import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                         max_length=96), len(tok), seed=0)
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": "100KB"} if sharded else {}))
    tok.save_pretrained(path)
    return path


def _edit_weights(d: Path, fn) -> None:
    f = d / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


class _Evil:
    """Unpickling this runs a shell command: exactly what `weights_only=True` must refuse."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def checkpoint_variants(good: Path, root: Path) -> dict[str, Path]:
    """Broken copies of the checkpoint `good`, by name."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def variant(name: str, fn) -> None:
        d = root / name
        shutil.copytree(good, d)
        fn(d)
        out[name] = d

    def truncate(d):
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) - 1000])

    def garbage_length(d):
        f = d / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(struct.pack("<Q", 2**62) + data[8:])

    def garbage_header(d):
        f = d / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[8:40] = b"\xff" * 32  # the JSON header is no longer JSON
        f.write_bytes(bytes(data))

    def renamed(sd):
        sd[TENSOR + "_renamed"] = sd.pop(TENSOR)

    def extra(sd):
        sd["model.extra_tensor.weight"] = torch.zeros(3)

    def wrong_shape(sd):
        sd[TENSOR] = sd[TENSOR][:, :10].contiguous()

    def poison(value):
        def fn(sd):
            sd[TENSOR][0, 0] = value
        return fn

    def pickle_only(d):
        sd = load_file(d / "model.safetensors")
        (d / "model.safetensors").unlink()
        torch.save(sd, d / "pytorch_model.bin")

    def malicious(d):
        (d / "model.safetensors").unlink()
        torch.save({"model.embed_tokens.weight": _Evil(d.parent / f"PWNED-{d.name}")}, d / "pytorch_model.bin")

    variant("truncated", truncate)
    variant("garbage_header_length", garbage_length)
    variant("garbage_header", garbage_header)
    variant("renamed_tensor", lambda d: _edit_weights(d, renamed))
    variant("extra_tensor", lambda d: _edit_weights(d, extra))
    variant("wrong_shape", lambda d: _edit_weights(d, wrong_shape))
    variant("nan_weights", lambda d: _edit_weights(d, poison(float("nan"))))
    variant("inf_weights", lambda d: _edit_weights(d, poison(float("inf"))))
    variant("pickle_only", pickle_only)
    variant("malicious_pickle", malicious)
    variant("bad_config_json", lambda d: (d / "config.json").write_text("{not json"))
    variant("no_config", lambda d: (d / "config.json").unlink())
    variant("bad_tokenizer", lambda d: (d / "tokenizer.json").write_text("[1, 2"))
    variant("bad_index", lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": 3}'))
    # sharded, with one shard deleted
    sharded = tiny_checkpoint(root / "missing_shard", sharded=True)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1, "the tiny checkpoint should save as several shards"
    shards[-1].unlink()
    out["missing_shard"] = sharded
    # a finite checkpoint whose task vector overflows with lambda 1e308
    variant("shifted", lambda d: _edit_weights(d, lambda sd: sd.update({k: v + 0.01 for k, v in sd.items()})))
    return out


# ------------------------------------------------------------------------------------------------
# configs and results

CONFIG = """\
name: corpus
model: {hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 2, max_length: 96}
world: {points24: {n_cards: 3, target: 12}, facts: {n_entities: 10}}
pretrain: {steps: 2, batch_size: 8}
methods:
  sft: {method: sft, task: coin, steps: 2, prompts_per_step: 2, samples_per_prompt: 2, expert_format: default}
  grpo: {method: grpo, task: coin, steps: 2, prompts_per_step: 2, samples_per_prompt: 2}
eval: {n_per_split: 4, n_sampled_problems: 0, max_new_tokens: 8}
"""


def _results(**over) -> dict:
    model = {"id_acc": 0.5, "ood_acc": 0.25, "retention": {"facts": 1.0}, "format_share": {"eq": 1.0}}
    res = {"study": "s", "seed": 0, "wall_seconds": 1.0, "id_task": "points24/id", "ood_task": "points24/ood",
           "retention_tasks": ["facts/id"], "models": {"base": model}, "forgetting": {}, "findings": []}
    res.update(over)
    return {k: v for k, v in res.items() if v is not None}


def build_corpus(root: Path, good: Path) -> list[Case]:
    """Write every fixture under `root` and return the CLI cases (each with its own cwd)."""
    ck = checkpoint_variants(good, root / "ck")
    cfgs = root / "configs"
    cfgs.mkdir()
    (cfgs / "ok.yaml").write_text(CONFIG)
    (cfgs / "bad_yaml.yaml").write_text("methods: {sft: [unclosed\n")
    (cfgs / "list.yaml").write_text("- 1\n- 2\n")
    (cfgs / "unknown_key.yaml").write_text(CONFIG + "learning_rate: 3\n")
    (cfgs / "escaping_name.yaml").write_text(CONFIG.replace("name: corpus", "name: ../../escaped"))
    (cfgs / "method_path.yaml").write_text(CONFIG.replace("  sft: {method: sft", "  ../sft: {method: sft"))
    (cfgs / "long_generation.yaml").write_text(CONFIG.replace("max_new_tokens: 8", "max_new_tokens: 500"))
    ok = str(cfgs / "ok.yaml")
    g = str(good)
    cases: list[Case] = []

    def case(id_: str, argv: list, expect: str, env: dict | None = None, setup=None, fresh: bool = False) -> None:
        cwd = root / "cases" / id_
        cwd.mkdir(parents=True)
        if setup:
            setup(cwd)
        cases.append(Case(id_, [str(a) for a in argv], expect, env or {}, cwd, fresh))

    ev = ["--tasks", "coin/id", "--config", ok]
    # ---- eval: every broken checkpoint, names the file or the tensor
    for name, expect in [("truncated", r"truncated/model\.safetensors: corrupt or truncated"),
                         ("garbage_header_length", r"garbage_header_length/model\.safetensors: corrupt"),
                         ("garbage_header", r"garbage_header/model\.safetensors: corrupt"),
                         ("renamed_tensor", rf"renamed_tensor: .*lacks .*{TENSOR}"),
                         ("extra_tensor", r"extra_tensor: .*model\.extra_tensor\.weight"),
                         ("wrong_shape", rf"wrong_shape: tensor {TENSOR} has shape \[32, 10\]"),
                         ("missing_shard", r"missing_shard: shard files .* missing: .*model-0000"),
                         ("nan_weights", rf"nan_weights: tensor {TENSOR} has non-finite"),
                         ("inf_weights", rf"inf_weights: tensor {TENSOR} has non-finite"),
                         ("pickle_only", r"pickle_only: only pickle weights .*--allow-pickle"),
                         ("bad_config_json", r"bad_config_json/config\.json: not valid JSON"),
                         ("no_config", r"no_config: not a Hugging Face checkpoint directory \(no config\.json\)"),
                         ("bad_tokenizer", r"bad_tokenizer: cannot load the tokenizer"),
                         ("bad_index", r"bad_index/model\.safetensors\.index\.json: corrupt index")]:
        case(f"eval-{name}", ["eval", ck[name], *ev], expect, fresh=name in ("truncated", "renamed_tensor"))
    case("eval-malicious_pickle", ["eval", ck["malicious_pickle"], *ev, "--allow-pickle"],
         r"malicious_pickle/pytorch_model\.bin: refused: not a plain tensor file")
    case("eval-missing_path", ["eval", root / "no" / "such" / "dir", *ev], r"not found: .*no/such/dir$")
    case("eval-hub_id_offline", ["eval", "not-a-dir/model", *ev], r"'not-a-dir/model'.*HF_HUB_OFFLINE.*local copy",
         env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf_home")}, fresh=True)
    case("eval-hub_id_online", ["eval", "not-a-dir/model", *ev], r"'not-a-dir/model'.*local copy",
         env={"HF_HUB_OFFLINE": "0", "HF_HOME": str(root / "hf_home")}, fresh=True)
    case("eval-device_tpu", ["eval", g, *ev, "--device", "tpu"], r"unknown device 'tpu'")
    case("eval-dtype", ["eval", g, *ev, "--dtype", "fp8"], r"unknown dtype 'fp8'")
    case("eval-out_existing_file", ["eval", g, *ev, "--out", "scores.json"], r"--out scores\.json exists; pass --overwrite",
         setup=lambda d: (d / "scores.json").write_text('{"kept": true}\n'))
    case("eval-out_is_dir", ["eval", g, *ev, "--out", "outdir"], r"--out outdir is a directory",
         setup=lambda d: (d / "outdir").mkdir())
    case("eval-max_new_tokens", ["eval", g, *ev, "--set", "eval.max_new_tokens=95"], r"eval\.max_new_tokens=95: .*context of 96")
    case("eval-unknown_task", ["eval", g, "--tasks", "nosuch/id", "--config", ok], r"unknown task 'nosuch'")
    case("eval-set_empty_component", ["eval", g, *ev, "--set", "methods..lr=1"], r"'methods\.\.lr'.*empty component")
    case("eval-set_no_equals", ["eval", g, *ev, "--set", "eval.n_per_split"], r"override 'eval\.n_per_split'")
    case("eval-set_unknown_key", ["eval", g, *ev, "--set", "eval.nope=1"], r"eval\.nope")
    case("eval-config_missing", ["eval", g, "--config", root / "nope.yaml"], r"config file not found: .*nope\.yaml")

    # ---- train: a broken base is refused before anything is written to --out
    tr = ["train", ok, "--method", "sft", "--out", "out"]
    for name, expect in [("truncated", r"truncated/model\.safetensors: corrupt or truncated"),
                         ("renamed_tensor", rf"renamed_tensor: .*{TENSOR}"),
                         ("wrong_shape", rf"wrong_shape: tensor {TENSOR} has shape"),
                         ("nan_weights", rf"nan_weights: tensor {TENSOR} has non-finite"),
                         ("inf_weights", rf"inf_weights: tensor {TENSOR} has non-finite"),
                         ("pickle_only", r"pickle_only: only pickle weights .*--allow-pickle")]:
        case(f"train-{name}", [*tr, "--base", ck[name]], expect)
    case("train-device_tpu", [*tr, "--base", g, "--device", "tpu"], r"unknown device 'tpu'")
    case("train-unknown_method", ["train", ok, "--method", "nope", "--base", g, "--out", "out"], r"method 'nope' is not in .*ok\.yaml")
    case("train-max_new_tokens", ["train", ok, "--method", "grpo", "--base", g, "--out", "out",
                                  "--set", "methods.grpo.max_new_tokens=90"], r"methods\.grpo\.max_new_tokens=90: .*context of 96")
    case("train-bad_yaml", ["train", cfgs / "bad_yaml.yaml", "--method", "sft", "--base", g, "--out", "out"],
         r"bad_yaml\.yaml: not valid YAML")
    case("train-non_mapping_yaml", ["train", cfgs / "list.yaml", "--method", "sft", "--base", g, "--out", "out"],
         r"list\.yaml: top level must be a mapping")
    case("train-unknown_key", ["train", cfgs / "unknown_key.yaml", "--method", "sft", "--base", g, "--out", "out"],
         r"learning_rate")
    case("train-set_empty_component", [*tr, "--base", g, "--set", "methods..lr=1"], r"'methods\.\.lr'.*empty component")
    case("train-out_is_file", [*tr[:-1], "out.txt", "--base", g], r"--out out\.txt is a file",
         setup=lambda d: (d / "out.txt").write_text("mine\n"))
    case("train-out_not_empty", [*tr, "--base", g], r"out exists and is not empty.*--resume",
         setup=lambda d: ((d / "out").mkdir(), (d / "out" / "metrics.jsonl").write_text('{"step": 0}\n')))

    # ---- diff
    case("diff-garbage_header_length", ["diff", g, ck["garbage_header_length"], "--out", "d"],
         r"garbage_header_length/model\.safetensors: corrupt")
    case("diff-missing_shard", ["diff", g, ck["missing_shard"], "--out", "d"], r"missing_shard: shard files .* missing")
    case("diff-renamed_tensor", ["diff", g, ck["renamed_tensor"], "--out", "d"], rf"architecture mismatch.*{TENSOR}")
    case("diff-wrong_shape", ["diff", g, ck["wrong_shape"], "--out", "d"], rf"architecture mismatch: {TENSOR} has shape")
    case("diff-pickle_only", ["diff", g, ck["pickle_only"], "--out", "d"], r"pickle_only: only pickle weights .*--allow-pickle")
    case("diff-malicious_pickle", ["diff", g, ck["malicious_pickle"], "--out", "d", "--allow-pickle"],
         r"malicious_pickle/pytorch_model\.bin: refused")
    case("diff-bad_index", ["diff", g, ck["bad_index"], "--out", "d"], r"bad_index/model\.safetensors\.index\.json: corrupt")
    case("diff-out_existing_file", ["diff", g, g, "--out", "d.json"], r"--out d\.json is a file",
         setup=lambda d: (d / "d.json").write_text("{}\n"))
    case("diff-out_existing_diff", ["diff", g, g, "--out", "d"], r"--out d already holds a finished diff \(diff\.json\)",
         setup=lambda d: ((d / "d").mkdir(), (d / "d" / "diff.json").write_text('{"kept": true}\n')))
    case("diff-device_tpu", ["diff", g, g, "--out", "d", "--device", "tpu"], r"unknown device 'tpu'")
    case("diff-missing_path", ["diff", g, root / "nothing", "--out", "d"], r"checkpoint not found: .*nothing")

    # ---- repair
    case("repair-interpolate_nan", ["repair", "interpolate", "--base", g, "--target", ck["nan_weights"], "--alpha", "0.5",
                                    "--out", "r"], rf"interpolate: {TENSOR} has non-finite values in the target")
    case("repair-task_arithmetic_nan", ["repair", "task-arithmetic", "--base", ck["inf_weights"], "--target", g,
                                        "--lambda", "0.5", "--out", "r"], rf"task_arithmetic: {TENSOR} has non-finite values in the base")
    case("repair-task_arithmetic_overflow", ["repair", "task-arithmetic", "--base", g, "--target", ck["shifted"],
                                             "--lambda", "1e308", "--out", "r"], r"task_arithmetic: the output tensor .* non-finite")
    case("repair-uv_merge_nan", ["repair", "uv-merge", "--base", g, "--target", ck["nan_weights"], "--top", "0.2",
                                 "--out", "r"], rf"{TENSOR} has non-finite values in the target")
    case("repair-reset_truncated", ["repair", "reset-layers", "--base", g, "--target", ck["truncated"], "--layers", "0",
                                    "--out", "r"], r"truncated/model\.safetensors: corrupt or truncated")
    case("repair-pickle_only", ["repair", "interpolate", "--base", ck["pickle_only"], "--target", g, "--alpha", "0.5",
                                "--out", "r"], r"pickle_only: only pickle weights .*--allow-pickle")
    case("repair-malicious_pickle", ["repair", "interpolate", "--base", ck["malicious_pickle"], "--target", g, "--alpha",
                                     "0.5", "--out", "r", "--allow-pickle"], r"malicious_pickle/pytorch_model\.bin: refused")
    case("repair-out_not_repair", ["repair", "interpolate", "--base", g, "--target", g, "--alpha", "0.5", "--out", "r",
                                   "--overwrite"], r"r exists and is not a repair output",
         setup=lambda d: ((d / "r").mkdir(), (d / "r" / "notes.txt").write_text("mine\n")))
    case("repair-device_tpu", ["repair", "uv-merge", "--base", g, "--target", g, "--top", "0.2", "--out", "r",
                               "--device", "tpu"], r"unknown device 'tpu'")

    # ---- report
    def results(text: str):
        return lambda d: ((d / "run").mkdir(), (d / "run" / "results.json").write_text(text))

    case("report-invalid_json", ["report", "run"], r"run/results\.json: not valid JSON", setup=results('{"study": '),
         fresh=True)
    case("report-not_object", ["report", "run"], r"run/results\.json: not a JSON object", setup=results("[1, 2]\n"))
    case("report-incomplete", ["report", "run"], r"run/results\.json: invalid results: models",
         setup=results(json.dumps(_results(models=None))))
    case("report-wrong_type", ["report", "run"], r"run/results\.json: invalid results: models\.base\.id_acc",
         setup=results(json.dumps(_results(models={"base": {"id_acc": "high"}}))))
    case("report-bad_diagnostics", ["report", "run"], r"run/results\.json: incomplete or invalid results",
         setup=results(json.dumps(_results(diagnostics={"sft": {"rel_update_by_layer_module": 3}}))))

    # ---- study and pretrain
    case("study-bad_yaml", ["study", cfgs / "bad_yaml.yaml", "--out", "s"], r"bad_yaml\.yaml: not valid YAML")
    case("study-non_mapping_yaml", ["study", cfgs / "list.yaml", "--out", "s"], r"list\.yaml: top level must be a mapping")
    case("study-unknown_key", ["study", cfgs / "unknown_key.yaml", "--out", "s"], r"learning_rate")
    case("study-name_escapes_runs", ["study", cfgs / "escaping_name.yaml"], r"study name '\.\./\.\./escaped'.*--out")
    case("study-method_name_path", ["study", cfgs / "method_path.yaml", "--out", "s"], r"'\.\./sft' cannot name a method")
    case("study-set_empty_component", ["study", ok, "--out", "s", "--set", "methods..lr=1"], r"'methods\.\.lr'.*empty component")
    case("study-max_new_tokens", ["study", cfgs / "long_generation.yaml", "--out", "s"],
         r"eval\.max_new_tokens=500 .*model\.max_length=96")
    case("study-device_tpu", ["study", ok, "--out", "s", "--device", "tpu"], r"unknown device 'tpu'")
    case("pretrain-existing_base", ["pretrain", ok, "--out", "p"], r"p/base exists",
         setup=lambda d: ((d / "p" / "base").mkdir(parents=True), (d / "p" / "base" / "config.json").write_text("{}\n")))
    return cases


# ------------------------------------------------------------------------------------------------
# verifiers


def huge_integer_cases() -> list[tuple[str, str, str]]:
    """(id, task, completion) with a number of 5000 digits where each format expects one; the
    problem is the task's first sample with seed 0."""
    return [
        ("arith-direct", "arith", HUGE),
        ("arith-cot", "arith", f"{HUGE}+1={HUGE},1-1=0"),
        ("arith-code", "arith", f"x={HUGE};x+=1;print(x)"),
        ("arith-code-update", "arith", f"x=1;x-={HUGE};print(x)"),
        ("points24-eq-rhs", "points24", f"1+2={HUGE}"),
        ("points24-eq-lhs", "points24", f"{HUGE}*1=24"),
        ("points24-steps", "points24", f"{HUGE}*1={HUGE},1+1=2"),
        ("facts", "facts", HUGE),
        ("strings", "strings", HUGE),
    ]
