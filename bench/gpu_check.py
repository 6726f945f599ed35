"""The GPU check of issue 15, one table: a short study on CUDA in bf16 at Qwen2.5-0.5B's shape, SFT
tokens/s and GRPO completions/s against TRL on the same GPU and configuration, vLLM against the
built-in sampler, and `posttrain diff --device cuda` against the CPU result on the same pair.

    bash bench/gpu_check.sh                                  # on a GPU machine: <= 8 minutes, no network
    .venv/bin/python bench/gpu_check.py --device cpu --tiny  # every part on a tiny model, in seconds

The model is random (seeded) at Qwen2.5-0.5B's shape (24 layers, hidden 896, MLP 4864, 14 heads, 2 KV
heads, vocabulary 151936, tied embeddings) with the character tokenizer and a Qwen-style chat
template (`posttrain.models.tiny.build_chat_tokenizer`): nothing is downloaded. Each part runs in a
subprocess of its own with a time limit, so one failure or timeout costs one row, not the table.
Throughput: both sides train on the identical points24 prompts (and, for SFT, identical
prompt+solution texts), batch shape, learning rate and budget; the first step of each side is
warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2, max_length=2048,
              tie_embeddings=True, vocab=151936)
TINY = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_length=256,
            tie_embeddings=True, vocab=None)


def _register_parity_task() -> None:
    """points24 prompts whose verifier accepts a completion of even length: a random model earns
    mixed rewards, so every GRPO group has a non-zero advantage on both sides (with all rewards 0,
    posttrain skips the backward of zero-advantage groups and TRL does not, which would flatter us)."""
    from posttrain.tasks import TASKS, Task, Verdict, build_task, register_task

    if "gpu_check_parity" in TASKS:
        return

    @register_task("gpu_check_parity")
    class Parity(Task):
        formats, splits = ("default",), ("id", "ood")

        def __init__(self) -> None:
            self.inner = build_task("points24")

        def sample(self, rng, split, partition="any"):
            p = self.inner.sample(rng, split, partition)
            return type(p)(self.name, split, p.prompt, p.data)

        def solve(self, problem, fmt, rng=None):
            return "ok"

        def verify(self, problem, completion):
            return Verdict(len(completion) % 2 == 0, False, "default")


# -- parts (each runs in its own process: `--part NAME`, one JSON line on stdout) -----------------

def build(a) -> dict:
    import torch

    from posttrain.config import ModelConfig
    from posttrain.models.loading import save_checkpoint
    from posttrain.models.tiny import build_chat_tokenizer, build_tiny_model

    shape = dict(TINY if a.tiny else QWEN05)
    vocab = shape.pop("vocab")
    tok = build_chat_tokenizer()
    model = build_tiny_model(ModelConfig(arch="qwen2", **shape), vocab or len(tok), seed=0)
    model.config.eos_token_id = tok.eos_token_id
    if not a.tiny:
        # A random model at 152k tokens almost never samples EOS (p ~ 8e-6 a step), so every GRPO
        # completion would be unfinished and earn 0, and posttrain would skip the backward that TRL
        # still runs. EOS's (tied) embedding row x10 makes p(EOS) ~ 0.03 a step (bench/eos_probe.py, on
        # random prompts): most of 64-token completions finish, at mixed lengths, so rewards are mixed.
        with torch.no_grad():
            model.get_input_embeddings().weight[tok.eos_token_id] *= 10.0
        model.to(torch.bfloat16)  # stored as Qwen2.5 ships; the study loads it in its dtype
    save_checkpoint(model, tok, a.work / "base")
    return {"params": sum(p.numel() for p in model.parameters())}


def _dtype(a) -> str:
    return "fp32" if a.device == "cpu" else "bf16"


def study(a) -> dict:
    import yaml

    cfg = {
        "name": "gpu-check", "base_model": str(a.work / "base"), "chat_template": "auto", "dtype": _dtype(a),
        "id_task": {"task": "points24", "split": "id"}, "ood_task": {"task": "points24", "split": "ood"},
        "retention": [{"task": "arith"}],
        "methods": {
            "sft": {"method": "sft", "task": "points24", "steps": 4, "prompts_per_step": 8, "samples_per_prompt": 1,
                    "lr": 1e-5, "max_new_tokens": 24},
            "grpo": {"method": "grpo", "task": "points24", "steps": 3, "prompts_per_step": 4, "samples_per_prompt": 4,
                     "lr": 1e-6, "max_new_tokens": 24},
        },
        "eval": {"n_per_split": 16, "n_sampled_problems": 0, "pass_k": [1], "max_new_tokens": 24},
        "kl": {"n_prompts": 8, "n_samples": 2},
        "diagnostics": {"spectral": False, "trajectory": False},
        "repair": {"damaged": None},
    }
    path = a.work / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "posttrain.cli", "study", str(path), "--out", str(a.work / "study"),
                        "--device", a.device], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError((r.stderr.strip().splitlines() or ["study failed"])[-1])
    res = json.loads((a.work / "study" / "results.json").read_text())
    return {"seconds": time.perf_counter() - t0, "models": sorted(res["models"]),
            "finite": all(v == v for m in res["models"].values() for v in (m["id_acc"], m["ood_acc"]))}


def _problems(steps: int, prompts: int, task_name: str = "points24"):
    from posttrain.tasks import build_task
    from posttrain.train.data_sources import prompt_schedule

    _register_parity_task()
    task = build_task(task_name)
    return task, prompt_schedule(task, "id", 0, steps, prompts)


def sft_ours(a) -> dict:
    from posttrain.config import TrainConfig
    from posttrain.models.loading import load_model
    from posttrain.train.loop import train
    from posttrain.train.sequences import encode_completions, encode_prompts

    task, schedule = _problems(a.steps, a.prompts)
    cfg = TrainConfig(objective="sft", data="expert", task="points24", steps=a.steps, prompts_per_step=a.prompts,
                      samples_per_prompt=1, lr=1e-5, trackers=["none"])
    res = train(cfg, init_dir=a.work / "base", ref_dir=None, out_dir=a.work / "sft_ours", task=task,
                expert_format="eq", seed=0, device=a.device, load_options={"dtype": _dtype(a)})
    rows = [json.loads(x) for x in res.metrics_path.read_text().splitlines()][2:]  # step 1: warm-up
    _, tok = load_model(a.work / "base")
    tokens = sum(len(p) + len(c) for step in schedule[1:] for p, c in
                 zip(encode_prompts(tok, [x.prompt for x in step]), encode_completions(tok, [task.solve(x, "eq") for x in step])))
    return {"seconds": sum(r["step_seconds"] for r in rows), "tokens": tokens}


def sft_trl(a) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from posttrain.models.loading import load_model

    task, schedule = _problems(a.steps, a.prompts)
    model, tok = load_model(a.work / "base", device="cpu")
    rows = [{"prompt": [{"role": "user", "content": p.prompt}], "completion": [{"role": "assistant", "content": task.solve(p, "eq")}]}
            for step in schedule for p in step]
    stamps: list[float] = []
    tokens: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    class Count(TrainerCallback):
        pass

    args = SFTConfig(output_dir=str(a.work / "sft_trl"), per_device_train_batch_size=a.prompts, max_steps=a.steps,
                     learning_rate=1e-5, lr_scheduler_type="constant", use_cpu=a.device == "cpu",
                     bf16=a.device != "cpu", report_to="none", save_strategy="no", logging_steps=10_000, seed=0,
                     completion_only_loss=True, disable_tqdm=True, dataloader_drop_last=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Clock()])
    for row in trainer.train_dataset.select(range(a.prompts, a.steps * a.prompts)):
        tokens.append(len(row["input_ids"]))
    trainer.train()
    return {"seconds": stamps[-1] - stamps[0], "tokens": sum(tokens)}


def grpo_ours(a) -> dict:
    from posttrain.config import TrainConfig
    from posttrain.train.loop import train

    task, _ = _problems(a.steps, a.prompts, "gpu_check_parity")
    cfg = TrainConfig(objective="grpo", task="gpu_check_parity", steps=a.steps, prompts_per_step=a.prompts,
                      samples_per_prompt=a.group, max_new_tokens=a.max_new, lr=1e-6, trackers=["none"])
    res = train(cfg, init_dir=a.work / "base", ref_dir=None, out_dir=a.work / "grpo_ours", task=task,
                expert_format=None, seed=0, device=a.device, load_options={"dtype": _dtype(a)})
    rows = [json.loads(x) for x in res.metrics_path.read_text().splitlines()][2:]
    return {"seconds": sum(r["step_seconds"] for r in rows), "completions": len(rows) * a.prompts * a.group,
            "mean_len": sum(r["rollout/len"] for r in rows) / len(rows),
            "reward": sum(r["rollout/reward"] for r in rows) / len(rows)}


def grpo_trl(a) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.models.loading import load_model

    task, schedule = _problems(a.steps, a.prompts, "gpu_check_parity")
    problems = {p.prompt: p for step in schedule for p in step}
    model, tok = load_model(a.work / "base", device="cpu")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}], "key": p.prompt}
                              for step in schedule for p in step])
    lens: list[int] = []
    rewards: list[float] = []

    def reward(prompts, completions, key, completion_ids, **kw):
        out = []
        for k, c, ids in zip(key, completions, completion_ids):
            text = c[0]["content"] if isinstance(c, list) else c
            # as posttrain scores: a completion without EOS within the budget earns nothing
            out.append(task.verify(problems[k], text).reward if tok.eos_token_id in list(ids) else 0.0)
            lens.append(len(ids))  # tokens, EOS included, as posttrain's rollout/len counts
        rewards.extend(out)
        return out

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    args = GRPOConfig(output_dir=str(a.work / "grpo_trl"), per_device_train_batch_size=a.prompts * a.group,
                      num_generations=a.group, gradient_accumulation_steps=1, max_completion_length=a.max_new,
                      temperature=1.0, beta=0.0, num_iterations=1, learning_rate=1e-6, lr_scheduler_type="constant",
                      max_steps=a.steps, use_cpu=a.device == "cpu", bf16=a.device != "cpu", report_to="none",
                      save_strategy="no", logging_steps=10_000, seed=0, shuffle_dataset=False, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    per = a.prompts * a.group
    return {"seconds": stamps[-1] - stamps[0], "completions": (len(stamps) - 1) * per,
            "mean_len": sum(lens[per:]) / max(len(lens[per:]), 1), "reward": sum(rewards[per:]) / max(len(rewards[per:]), 1)}


def sampler(a) -> dict:
    """Completions/s of the built-in sampler and (when it can run) vLLM, same prompts and budget."""
    import torch

    from posttrain.models.loading import load_model
    from posttrain.train.rollout import generate
    from posttrain.train.sequences import encode_prompts
    from posttrain.train.vllm_rollout import VllmEngine, unavailable_reason

    _, schedule = _problems(2, a.prompts * 4)
    prompts = [p.prompt for p in schedule[1]]
    model, tok = load_model(a.work / "base", device=a.device, dtype=_dtype(a))
    out = {}
    generate(model, tok, prompts[:4], n=2, max_new_tokens=4, generator=torch.Generator().manual_seed(0))  # warm-up
    t0 = time.perf_counter()
    ro = generate(model, tok, prompts, n=a.group, max_new_tokens=a.max_new, generator=torch.Generator().manual_seed(1))
    out["builtin"] = {"seconds": time.perf_counter() - t0, "completions": len(ro.texts)}
    why = unavailable_reason(a.device)
    if why:
        out["vllm"] = {"skipped": why}
        return out
    engine = VllmEngine(a.work / "base", lambda: model.state_dict().items(), gpu_memory_utilization=0.3,
                        max_model_len=None, dtype=next(model.parameters()).dtype, seed=0)
    ids = encode_prompts(tok, prompts)
    engine.generate(ids[:4], 2, 4, 1.0, False, 0, 1.0, tok.eos_token_id)  # warm-up (and the first weight sync)
    t0 = time.perf_counter()
    comps, _ = engine.generate(ids, a.group, a.max_new, 1.0, False, 1, 1.0, tok.eos_token_id)
    out["vllm"] = {"seconds": time.perf_counter() - t0, "completions": len(comps)}
    return out


def diff_pair(a) -> dict:
    """`posttrain diff --spectral` of base vs the study's SFT model on the CPU and on --device."""
    import pandas as pd

    # the study's SFT model, or (when the study was not among the parts) the bare SFT run's
    target = next((d for d in (a.work / "study" / "methods" / "sft" / "model", a.work / "sft_ours" / "model")
                   if (d / "config.json").is_file()), None)
    if target is None:
        raise RuntimeError("no SFT model to diff: run the study or sft_ours part first")
    res = {}
    for dev in ("cpu", a.device) if a.device != "cpu" else ("cpu",):
        t0 = time.perf_counter()
        out = a.work / f"diff_{dev.replace(':', '_')}"
        r = subprocess.run([sys.executable, "-m", "posttrain.cli", "diff", str(a.work / "base"), str(target), "--out",
                            str(out), "--spectral", "--device", dev, "--no-plots", "--overwrite"],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"diff --device {dev}: " + (r.stderr.strip().splitlines() or ["failed"])[-1])
        res[dev] = {"seconds": time.perf_counter() - t0}
    if len(res) == 2:
        cpu = pd.read_csv(a.work / "diff_cpu" / "tensors.csv")
        gpu = pd.read_csv(a.work / f"diff_{a.device.replace(':', '_')}" / "tensors.csv")
        cols = [c for c in cpu.columns if c in gpu.columns and pd.api.types.is_float_dtype(cpu[c])]
        worst = max(((float(((cpu[c] - gpu[c]).abs() / (cpu[c].abs() + 1e-12)).max()), c) for c in cols
                     if cpu[c].notna().any()), default=(0.0, "-"))
        res["max_rel_diff"] = {"value": worst[0], "column": worst[1]}
    return res


PARTS = {"build": build, "study": study, "sft_ours": sft_ours, "sft_trl": sft_trl, "grpo_ours": grpo_ours,
         "grpo_trl": grpo_trl, "sampler": sampler, "diff": diff_pair}


# -- driver -------------------------------------------------------------------------------------

def run_part(name: str, a, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--part", name, "--work", str(a.work), "--device", a.device, "--steps", str(a.steps),
           "--prompts", str(a.prompts), "--group", str(a.group), "--max-new", str(a.max_new)] + (["--tiny"] if a.tiny else [])
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    if r.returncode:
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        return {"error": (lines[-1] if lines else f"exit {r.returncode}")[:160]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall"] = time.perf_counter() - t0
    return out


def table(res: dict, a) -> list[tuple[str, str, str]]:
    def rate(x, key):
        return x[key] / x["seconds"] if "seconds" in x and x.get("seconds") else None

    rows = [("model", f"{res['build'].get('params', 0) / 1e6:.1f}M params, {'tiny' if a.tiny else 'Qwen2.5-0.5B shape'}",
             res["build"].get("error", "ok"))]
    s = res.get("study", {})
    rows.append(("(a) study on " + a.device, f"{s['seconds']:.0f}s, {_dtype(a)}, models {', '.join(s['models'])}"
                 if "seconds" in s else "-", s.get("error", "ok" if s.get("finite") else "non-finite accuracy")))
    for what, key, unit in (("sft", "tokens", "tokens/s"), ("grpo", "completions", "completions/s")):
        o, t = res.get(f"{what}_ours", {}), res.get(f"{what}_trl", {})
        ro, rt = rate(o, key), rate(t, key)
        val = f"posttrain {ro:.1f} vs TRL {rt:.1f} {unit}: {ro / rt:.2f}x" if ro and rt else "-"
        if what == "grpo" and ro and rt:  # different mean lengths or rewards make the ratio unequal work
            val += f" (len {o['mean_len']:.1f}/{t['mean_len']:.1f}, reward {o['reward']:.2f}/{t['reward']:.2f})"
        rows.append((f"(b) {what.upper()} vs TRL", val, "; ".join(x for x in (o.get("error"), t.get("error")) if x) or "ok"))
    sm = res.get("sampler", {})
    b, v = sm.get("builtin", {}), sm.get("vllm", {})
    if "skipped" in v:
        rows.append(("(c) vLLM vs built-in", f"built-in {rate(b, 'completions') or 0:.1f} completions/s", f"vLLM skipped: {v['skipped']}"))
    else:
        rb, rv = rate(b, "completions"), rate(v, "completions")
        rows.append(("(c) vLLM vs built-in", f"vLLM {rv:.1f} vs built-in {rb:.1f} completions/s: {rv / rb:.2f}x"
                     if rb and rv else "-", sm.get("error", "ok")))
    d = res.get("diff", {})
    secs = ", ".join(f"{k} {v['seconds']:.0f}s" for k, v in d.items() if isinstance(v, dict) and "seconds" in v)
    m = d.get("max_rel_diff")
    rows.append(("(d) diff cuda vs cpu", secs + (f"; max rel. diff {m['value']:.2e} ({m['column']})" if m else ""),
                 d.get("error", "ok")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model instead of Qwen2.5-0.5B's shape (CPU-safe)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "gpu_check")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--budget", type=float, default=450, help="seconds for all parts together")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated parts to run, in the table's order (a rerun of the ones that failed)")
    ap.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    chosen = [p for p in a.parts.split(",") if p]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)} (parts: {', '.join(PARTS)})")
    if a.part:
        print(json.dumps(PARTS[a.part](a)))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    # shares of the budget per part; a part that ends early leaves its time to the next ones
    shares = {"build": 0.06, "study": 0.2, "sft_ours": 0.08, "sft_trl": 0.08, "grpo_ours": 0.12, "grpo_trl": 0.12,
              "sampler": 0.14, "diff": 0.2}
    t_end = time.perf_counter() + a.budget
    res = {n: {"error": "not run (--parts)"} for n in PARTS}
    order = [n for n in PARTS if n in chosen]
    for i, name in enumerate(order):
        left = t_end - time.perf_counter()
        weight = shares[name] / sum(shares[n] for n in order[i:])
        # building and saving the 0.5B model takes ~24 s on an H200 machine, and every part needs it
        floor = 60.0 if name == "build" and not a.tiny else 5.0
        res[name] = run_part(name, a, min(max(floor, left * weight), max(left, 5.0)))
        print(f"[{name}] {json.dumps(res[name])}", file=sys.stderr, flush=True)
    import platform

    import torch

    hw = torch.cuda.get_device_name(0) if a.device != "cpu" and torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"\nposttrain GPU check: {hw}, torch {torch.__version__}, device {a.device}, "
          f"steps {a.steps}, {a.prompts} prompts x {a.group}, max_new {a.max_new}")
    rows = table(res, a)
    w = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:<{w2}}  {r[2]}")
    (a.work / "gpu_check.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
