"""A study: pretrain (or load) a base, post-train it with each method, evaluate, diff, report.

Each stage writes its outputs under the run directory plus a stamp holding the hash of everything
the stage depends on; a resumed study skips a stage whose stamp matches, so `make demo` twice costs
one run, and a crash resumes from the last finished stage.
"""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from posttrain.config import StudyConfig, TrainConfig, config_hash, dump_yaml, init_ref, source_label
from posttrain.errors import UserError
from posttrain.evaluation.evaluate import eval_problems, evaluate_model
from posttrain.evaluation.lm_eval_bridge import evaluate_lm_eval_refs, local_tasks_digest
from posttrain.io import atomic_write_json, atomic_write_text, read_json, versions
from posttrain.progress import progress_logger
from posttrain.tasks import Problem, Task

console = Console(stderr=True, soft_wrap=True)


class Run:
    """Paths of a run directory (docs/architecture.md, "Run directory")."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    base = property(lambda self: self.root / "base")
    pretrain = property(lambda self: self.root / "pretrain")
    results = property(lambda self: self.root / "results.json")
    report = property(lambda self: self.root / "report.html")

    def method(self, name: str) -> Path:
        return self.root / "methods" / name

    def model(self, name: str) -> Path:
        return self.base if name == "base" else self.method(name) / "model"

    def eval(self, name: str) -> Path:
        return self.root / "eval" / f"{name}.json"

    def kl(self, name: str) -> Path:
        return self.root / "kl" / f"{name}.json"

    def diagnostics(self, a: str, b: str) -> Path:
        return self.root / "diagnostics" / f"{a}__{b}.json"

    def stamp(self, stage: str) -> Path:
        return self.root / ".stages" / f"{stage}.json"


class Stages:
    """Skip-if-done bookkeeping keyed by a content hash of each stage's inputs."""

    def __init__(self, run: Run, resume: bool) -> None:
        self.run, self.resume = run, resume

    def done(self, stage: str, key: str, outputs: list[Path]) -> bool:
        stamp = self.run.stamp(stage)
        if not (self.resume and stamp.is_file() and all(p.exists() for p in outputs)):
            return False
        return read_json(stamp).get("key") == key

    def finish(self, stage: str, key: str, info: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.run.stamp(stage), {"key": key, "finished": time.time(), **(info or {})})

    def claim(self, work_dir: Path, key: str) -> None:
        """Prepare the working directory of an unfinished stage: its partial outputs (checkpoints to
        resume from) are kept only when resuming the same stage key; anything else is cleared."""
        key_file = work_dir / "stage_key"
        if work_dir.exists() and not (self.resume and key_file.is_file() and key_file.read_text() == key):
            shutil.rmtree(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)


def build_tasks(cfg: StudyConfig) -> dict[str, Task]:
    names = {cfg.id_task.task, cfg.ood_task.task, *(r.task for r in cfg.task_retention),
             *(r.task for r in cfg.pretrain.mixture), *(m.task for m in cfg.methods.values())}
    return {n: cfg.make_task(n) for n in sorted(names)}


def method_order(cfg: StudyConfig) -> list[str]:
    """Methods sorted so that a method initialised from another runs after it."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise UserError(f"methods form an init cycle through {name!r}")
        visiting.add(name)
        ref = init_ref(cfg.methods[name].init, cfg.methods)
        if ref is not None:
            visit(ref.method)
        order.append(name)

    for name in cfg.methods:
        visit(name)
    return order


def least_used_format(task: Task, shares: dict[str, float]) -> str:
    """The format the base model writes least often among those the task's expert can write (ties:
    the task's format order)."""
    fmts = task.solution_formats
    if not fmts:
        raise UserError(f"task {task.name!r} has no reference solutions, so it cannot be used for SFT on expert data")
    return min(fmts, key=lambda f: (shares.get(f, 0.0), fmts.index(f)))


def expert_format_for(m: TrainConfig, task: Task, base_shares: Callable[[], dict[str, float]]) -> str | None:
    """The solution format of a method's expert demonstrations: None unless it trains on expert data;
    the method's `expert_format` when set; else the format the base writes least (`base_shares()`
    gives the base's sampled format shares on the method's task split, computed only when needed)."""
    if m.data_source != "expert":
        return None
    return m.data_params.expert_format or least_used_format(task, base_shares())


def base_format_shares(cfg: StudyConfig, task: Task, split: str, model_dir: Path, device: str = "auto") -> dict[str, float]:
    """Sampled format shares of a checkpoint on a task split (used to pick the expert format)."""
    from posttrain.evaluation.evaluate import evaluate_split
    from posttrain.models.loading import load_model

    model, tok = load_model(model_dir, device=device, **cfg.load_options)
    problems = eval_problems(task, split, cfg.eval.n_per_split, cfg.seed)
    return evaluate_split(model, tok, task, problems, cfg.eval, cfg.seed)["format_share"]


def method_key(m: TrainConfig) -> dict:
    """A method's knobs for its stage key; lora and rollout only when set, so the keys of runs made
    before they existed stay valid (the rollout backend changes samples: vLLM's, not ours)."""
    out = m.model_dump(mode="json")
    if m.lora is None:
        out.pop("lora")
    if m.rollout == type(m.rollout)():
        out.pop("rollout")
    return out


def pretrain_key(cfg: StudyConfig) -> str:
    """The stage key of the base model: everything the pretrained (or loaded) base depends on."""
    return config_hash({"model": cfg.model.model_dump(), "pretrain": cfg.pretrain.model_dump(mode="json"),
                        "world": cfg.world_key, "seed": cfg.seed, "base_model": cfg.base_model,
                        # only when set, so the keys of existing runs stay valid
                        **({k: v for k, v in cfg.load_options.items() if v != StudyConfig.model_fields[k].default})})


def run_study(cfg: StudyConfig, out: str | Path, resume: bool = False, device: str = "auto",
              log: Callable[[str], None] | None = None) -> dict:
    """Run every stage of the study into `out`; return the results dict (also `results.json`)."""
    t0 = time.time()
    say = log or (lambda msg: console.print(f"[bold cyan]posttrain[/] {msg}"))
    run = Run(out)
    if run.root.exists() and any(run.root.iterdir()) and not resume:
        raise UserError(f"{run.root} exists and is not empty; pass --resume to continue it or choose another --out")
    if cfg.base_model is not None:  # checked before anything is written
        from posttrain.models.loading import open_checkpoint

        base_dir, _ = open_checkpoint(cfg.base_model)
    run.root.mkdir(parents=True, exist_ok=True)
    stages = Stages(run, resume)
    atomic_write_text(run.root / "config.yaml", dump_yaml(cfg))
    atomic_write_json(run.root / "versions.json", versions())
    tasks = build_tasks(cfg)

    # ---- base model -------------------------------------------------------------------------
    base_key = pretrain_key(cfg)
    if cfg.base_model is None:
        base_dir = run.base
        if stages.done("pretrain", base_key, [run.base / "config.json"]):
            say("pretrain: cached")
        else:
            from posttrain.train.pretrain import pretrain

            say(f"pretrain: {cfg.pretrain.steps} steps on the task mixture")
            stages.claim(run.pretrain, base_key)
            pretrain(cfg.model, cfg.pretrain, tasks, run.pretrain, run.base, cfg.seed, device=device,
                     on_step=progress_logger(say, "pretrain", cfg.pretrain.steps), resume=resume)
            stages.finish("pretrain", base_key)

    # ---- evaluation sets --------------------------------------------------------------------
    refs = {cfg.id_task.key: cfg.id_task, cfg.ood_task.key: cfg.ood_task}
    for r in cfg.task_retention:
        refs.setdefault(r.key, r)
    problem_sets = {k: eval_problems(tasks[r.task], r.split, cfg.eval.n_per_split, cfg.seed) for k, r in refs.items()}
    lm_refs = cfg.lm_eval_retention
    eval_key = config_hash({"eval": cfg.eval.model_dump(), "refs": sorted(refs), "world": cfg.world_key, "seed": cfg.seed,
                            **({"lm_eval": [r.model_dump(mode="json") for r in lm_refs],
                                "local_tasks": local_tasks_digest(lm_refs)} if lm_refs else {})})

    def evaluate(name: str, model_dir: Path, upstream: str) -> dict:
        key = config_hash({"upstream": upstream, "eval": eval_key})
        if stages.done(f"eval-{name}", key, [run.eval(name)]):
            say(f"eval {name}: cached")
            return read_json(run.eval(name))
        from posttrain.models.loading import check_generation_fits, load_model

        say(f"eval {name}")
        model, tok = load_model(model_dir, device=device, **cfg.load_options)
        check_generation_fits(model, tok, [p.prompt for ps in problem_sets.values() for p in ps],
                              cfg.eval.max_new_tokens, "eval.max_new_tokens")
        scores = evaluate_model(model, tok, tasks, problem_sets, cfg.eval, cfg.seed)
        scores.update(evaluate_lm_eval_refs(model, tok, lm_refs, cfg.seed))
        atomic_write_json(run.eval(name), scores)
        stages.finish(f"eval-{name}", key)
        return scores

    evals = {"base": evaluate("base", base_dir, base_key)}
    model_dirs = {"base": base_dir}
    keys = {"base": base_key}

    # ---- post-training methods --------------------------------------------------------------
    curve_n = min(64, cfg.eval.n_per_split)
    curve_problems: dict[str, list[Problem]] = {
        cfg.id_task.key: problem_sets[cfg.id_task.key][:curve_n],
        cfg.ood_task.key: problem_sets[cfg.ood_task.key][:curve_n],
    }
    checkpoint_evals: dict[str, list[dict]] = {}  # method -> [{step, id_acc, ood_acc}], final model last
    peaks: dict[str, dict] = {}  # method -> its point with the best OOD accuracy
    starts: dict[str, dict] = {}  # method -> {init, method, step} when it starts from another method
    for name in method_order(cfg):
        m = cfg.methods[name]
        task = tasks[m.task]
        base_eval = evals["base"].get(f"{m.task}/{m.split}")
        expert_format = expert_format_for(m, task, lambda: base_eval["format_share"] if base_eval else {})
        # "base", a directory, or an earlier method's final model or kept checkpoint; the stage key
        # of the weights it starts from is part of this method's key
        init_dir, upstream, start = resolve_start(cfg, m, run, model_dirs, keys, peaks)
        if start is not None:
            starts[name] = start
        key = config_hash({"method": method_key(m), "init": upstream, "base": base_key,
                           "expert_format": expert_format, "seed": cfg.seed, "world": cfg.world_key})
        out_dir = run.method(name)
        if stages.done(f"train-{name}", key, [out_dir / "model" / "config.json"]):
            say(f"train {name}: cached")
        else:
            from posttrain.train.loop import train

            stages.claim(out_dir, key)
            data = m.data_source
            fmt_note = f", expert format {expert_format!r}" if data == "expert" else f", {data} data"
            say(f"train {name}: {m.objective} on {m.task}/{m.split}, {m.steps} steps{fmt_note}")
            train(m, init_dir=init_dir, ref_dir=base_dir, out_dir=out_dir, task=task, expert_format=expert_format,
                  seed=cfg.seed if m.seed is None else m.seed, curve_tasks=tasks, curve_problems=curve_problems,
                  curve_every=max(1, m.steps // 10), device=device, resume=resume,
                  on_step=progress_logger(say, f"train {name}", m.steps), method=name, load_options=cfg.load_options)
            stages.finish(f"train-{name}", key)
        model_dirs[name] = out_dir / "model"
        keys[name] = key
        evals[name] = evaluate(name, model_dirs[name], key)
        if name in cfg.checkpoint_eval_methods:
            checkpoint_evals[name] = checkpoint_curve(cfg, run, stages, name, key, evals[name], tasks, problem_sets,
                                                      eval_key, device, say)
            peaks[name] = peak_ood(checkpoint_evals[name])

    # ---- weight diagnostics -----------------------------------------------------------------
    diagnostics, diag_extra = weight_diagnostics(cfg, run, stages, base_dir, model_dirs, keys, base_key, say)

    # ---- KL to the base on each method's task ------------------------------------------------
    kls = kl_stage(cfg, run, stages, tasks, base_dir, model_dirs, keys, base_key, device, say)

    # ---- recovery sweep ---------------------------------------------------------------------
    repairs: dict = {}
    repair_source_info: dict = {}
    damaged = damaged_method(cfg)
    if damaged is not None and cfg.repair.grid:
        repairs, repair_source_info = repair_sweep(cfg, damaged, run, tasks, problem_sets, evals, model_dirs, keys,
                                                eval_key, device, say, peaks=peaks, evaluate=evaluate)

    # ---- results and report -----------------------------------------------------------------
    from posttrain.findings import evaluate_findings
    from posttrain.results import assemble_results

    results = assemble_results(cfg, evals, diagnostics, run, wall_seconds=time.time() - t0, diag_extra=diag_extra)
    results["repairs"] = repairs
    from posttrain.analysis.predictors import points_from_results, predictor_fits

    results["kl_to_base"] = kls
    results["forgetting_predictors"] = predictor_fits(points_from_results(results))
    results["checkpoint_evals"] = checkpoint_evals
    results["peak_ood"] = peaks
    results["init_from"] = starts
    results["repair_sources"] = repair_source_info
    results["findings"] = evaluate_findings(results, cfg)
    atomic_write_json(run.results, results)
    from posttrain.report.html import write_report

    write_report(run.root)
    say(f"done in {time.time() - t0:.0f}s: {run.results} and {run.report}")
    return results


def resolve_start(cfg: StudyConfig, m: TrainConfig, run: Run, model_dirs: dict[str, Path], keys: dict[str, str],
                  peaks: dict[str, dict]) -> tuple[Path, str, dict | None]:
    """Where method `m` starts: (its init directory, the stage key of those weights, and {init, method,
    step} when `init` names another method of the study, else None). The named method has run
    (`method_order`) and, for `@peak_ood`, its checkpoints have been evaluated (`peaks`)."""
    ref = init_ref(m.init, cfg.methods)
    if ref is None:
        if m.init == "base":
            return model_dirs["base"], keys["base"], None
        return Path(m.init), config_hash({"path": str(Path(m.init))}), None
    src = cfg.methods[ref.method]
    step = {"end": src.steps, "peak_ood": peaks.get(ref.method, {}).get("step")}.get(ref.point, ref.step)
    if step == src.steps:  # the final model (a checkpoint kept at the last step holds the same weights)
        return model_dirs[ref.method], keys[ref.method], {"init": m.init, "method": ref.method, "step": step}
    path = run.method(ref.method) / "checkpoints" / f"step-{step}"
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: the checkpoint that init {m.init!r} names is missing "
                        f"(rerun the study without --resume to train {ref.method} again)")
    return path, config_hash({"from": keys[ref.method], "step": step}), {"init": m.init, "method": ref.method, "step": step}


def peak_ood(points: list[dict]) -> dict:
    """The point of a checkpoint curve with the highest OOD accuracy (ties: the earliest step)."""
    if not points:
        raise ValueError("peak_ood of an empty checkpoint curve")
    return dict(max(points, key=lambda p: (p["ood_acc"], -p["step"])))


def checkpoint_curve(cfg: StudyConfig, run: Run, stages: Stages, name: str, key: str, final_scores: dict,
                     tasks: dict[str, Task], problem_sets: dict[str, list[Problem]], eval_key: str, device: str,
                     say: Callable[[str], None]) -> list[dict]:
    """Greedy in-domain and OOD accuracy of every kept checkpoint of method `name` on the study's fixed
    problem sets, each cached as the stage `eval-<name>@step-<N>` (eval/<name>@step-<N>.json); the
    final model's point comes from its own evaluation. Returns [{step, id_acc, ood_acc}] by step."""
    from posttrain.models.loading import load_model

    m = cfg.methods[name]
    id_key, ood_key = cfg.id_task.key, cfg.ood_task.key
    sets = {id_key: problem_sets[id_key], ood_key: problem_sets[ood_key]}
    greedy = cfg.eval.model_copy(update={"n_sampled_problems": 0})
    points = []
    for step in (s for s in m.kept_steps if s < m.steps):
        label = f"{name}@step-{step}"
        ck = run.method(name) / "checkpoints" / f"step-{step}"
        ck_key = config_hash({"upstream": key, "step": step, "eval": eval_key, "sets": sorted(sets)})
        if stages.done(f"eval-{label}", ck_key, [run.eval(label)]):
            scores = read_json(run.eval(label))
        else:
            if not (ck / "config.json").is_file():
                raise UserError(f"{ck}: kept checkpoint missing (rerun the study without --resume to train {name} again)")
            say(f"eval {label}")
            model, tok = load_model(ck, device=device, **cfg.load_options)
            scores = evaluate_model(model, tok, tasks, sets, greedy, cfg.seed)
            atomic_write_json(run.eval(label), scores)
            stages.finish(f"eval-{label}", ck_key)
        points.append({"step": step, "id_acc": scores[id_key]["acc"], "ood_acc": scores[ood_key]["acc"]})
    points.append({"step": m.steps, "id_acc": final_scores[id_key]["acc"], "ood_acc": final_scores[ood_key]["acc"]})
    return points


def weight_diagnostics(cfg: StudyConfig, run: Run, stages: Stages, base_dir: Path, model_dirs: dict[str, Path],
                       keys: dict[str, str], base_key: str, say: Callable[[str], None]) -> tuple[dict, dict]:
    """Every method's model and every training checkpoint against the base in one streamed pass
    (base tensors read once): the updates of each pair of methods compared by cosine, and each
    method's trajectory over its checkpoints.

    Writes diagnostics/base__<m>.json and <a>__<b>.json, diagnostics/diff/ (tables and
    plots of `posttrain diff`) and diagnostics/trajectory/. Returns ({method: summary JSON},
    {"pairs": {"a|b": pair JSON}, "trajectory": {method: [points]}}).
    """
    from posttrain.analysis.diff import MAX_DEFAULT_PAIRS_MODELS, diff, write_outputs
    from posttrain.analysis.trajectory import (TrajectoryResult, find_checkpoints, step_key, trajectory_plan,
                                               trajectory_points, write_trajectory)

    dcfg = cfg.diagnostics
    names = list(cfg.methods)
    root = run.root / "diagnostics"
    extra_path = root / "extra.json"
    # the null (a seeded random update) is part of the diagnostics: diagnostics written before it are redone
    key = config_hash({"base": base_key, "models": {n: keys[n] for n in names}, "diagnostics": dcfg.model_dump(),
                       "null_seed": cfg.seed})
    outputs = [run.diagnostics("base", n) for n in names] + [extra_path]
    if stages.done("diagnostics", key, outputs):
        return {n: read_json(run.diagnostics("base", n)) for n in names}, read_json(extra_path)
    # One streamed pass covers the final models and every checkpoint, so the base is read once. A
    # method's final model is the last point of its trajectory: its checkpoint at the final step
    # holds the same weights and is not read a second time.
    final = {n: cfg.methods[n].steps for n in names}
    runs = {}
    if dcfg.trajectory:
        for n in names:
            if cks := find_checkpoints(run.method(n)):
                runs[n] = [*((s, p) for s, p in cks if s < final[n]), (final[n], model_dirs[n])]

    def point_key(method: str, step: int) -> str:
        return method if step == final[method] else step_key(method, step)

    traj_models, traj_pairs = trajectory_plan(runs, point_key)
    # a method started from another one's model carries that model's update: the cosines compare the
    # methods trained from the base (or a directory)
    roots = [n for n in names if init_ref(cfg.methods[n].init, cfg.methods) is None]
    method_pairs = list(itertools.combinations(roots, 2)) if 2 <= len(roots) <= MAX_DEFAULT_PAIRS_MODELS else []
    n_ck = len(traj_models) - len(runs)
    say(f"diff base vs {', '.join(names)}" + (" (spectral)" if dcfg.spectral else "")
        + (f" and {n_ck} earlier checkpoint{'s' * (n_ck != 1)}" if n_ck else ""))
    res = diff(base_dir, {**{n: model_dirs[n] for n in names}, **traj_models}, None, plots=False,
               show_progress=False, spectral=dcfg.spectral, top_frac=dcfg.top_frac, bins=dcfg.bins,
               compare_pairs=method_pairs + traj_pairs, null_seed=cfg.seed,
               null_models=names)  # the findings read the final models' null; checkpoints skip its SVDs
    main = res.subset(names, method_pairs)
    write_outputs(main, root / "diff")
    summaries = {n: main.summaries[n].to_json() for n in names}
    for n in names:
        atomic_write_json(run.diagnostics("base", n), summaries[n])
    pairs = {f"{a}|{b}": p.to_json() for (a, b), p in main.pairs.items()}
    for a, b in main.pairs:
        atomic_write_json(run.diagnostics(a, b), pairs[f"{a}|{b}"])
    traj: dict[str, list[dict]] = {}
    if runs:
        points = trajectory_points(res, runs, point_key)
        tr = TrajectoryResult(res.subset(list(traj_models), traj_pairs), points, point_key)
        write_trajectory(tr, root / "trajectory")
        for p in tr.points:  # paths inside the run dir would not survive a move of it
            traj.setdefault(p["run"], []).append({k: v for k, v in p.items() if k not in ("run", "checkpoint")})
    extra = {"pairs": pairs, "trajectory": traj}
    atomic_write_json(extra_path, extra)
    stages.finish("diagnostics", key)
    return summaries, extra


def kl_stage(cfg: StudyConfig, run: Run, stages: Stages, tasks: dict[str, Task], base_dir: Path,
             model_dirs: dict[str, Path], keys: dict[str, str], base_key: str, device: str,
             say: Callable[[str], None]) -> dict[str, dict]:
    """Every method's KL to the base, both directions, on the first `kl.n_prompts` problems of its
    task split's fixed test set (posttrain/evaluation/kl.py); one cached stage per method, written to
    kl/<m>.json. The base's completions of a task split are drawn once and shared by its methods."""
    kc = cfg.kl
    if kc.n_prompts == 0:
        return {}
    from posttrain.evaluation.kl import kl_seed, kl_to_base, sample
    from posttrain.models.loading import load_model

    max_new = kc.max_new_tokens or cfg.eval.max_new_tokens
    base: tuple | None = None
    base_samples: dict[str, Any] = {}
    out: dict[str, dict] = {}
    for name, m in cfg.methods.items():
        split = f"{m.task}/{m.split}"
        key = config_hash({"model": keys[name], "base": base_key, "kl": kc.model_dump(), "max_new_tokens": max_new,
                           "split": split, "seed": cfg.seed, "world": cfg.world_key})
        if stages.done(f"kl-{name}", key, [run.kl(name)]):
            say(f"kl {name}: cached")
            out[name] = read_json(run.kl(name))
            continue
        say(f"kl {name} vs base on {split}: {kc.n_prompts} prompts x {kc.n_samples} samples")
        problems = eval_problems(tasks[m.task], m.split, kc.n_prompts, cfg.seed)[: kc.n_prompts]
        prompts = [p.prompt for p in problems]
        base = base or load_model(base_dir, device=device, **cfg.load_options)
        if split not in base_samples:
            base_samples[split] = sample(base[0], base[1], prompts, kc.n_samples, max_new,
                                         kl_seed(cfg.seed, split, "base"), kc.batch_size)
        model, _ = load_model(model_dirs[name], device=device, **cfg.load_options)
        out[name] = {"task": split, "n_prompts": len(prompts), "n_samples": kc.n_samples, "max_new_tokens": max_new,
                     "temperature": 1.0, **kl_to_base(model, base[0], base[1], base_samples[split], prompts, max_new,
                                                      kl_seed(cfg.seed, split, "policy"), kc.batch_size)}
        atomic_write_json(run.kl(name), out[name])
        stages.finish(f"kl-{name}", key)
    return out


def damaged_method(cfg: StudyConfig) -> str | None:
    """The method whose model the recovery sweep repairs (see RepairConfig.damaged)."""
    return cfg.damaged_method


def repair_sources(cfg: StudyConfig, damaged: str, run: Run, model_dirs: dict[str, Path], keys: dict[str, str],
                   peaks: dict[str, dict], evaluate: Callable[[str, Path, str], dict]) -> tuple[list[dict], dict]:
    """The models the repairs restore from (`repair.source`): [{source, label, model, dir, key, scores}]
    and {label: why} for sources skipped (the damaged method's peak-OOD point is its final model, so
    there is nothing to restore). `scores` holds at least the greedy id/ood accuracy (the base's and a
    directory's full evaluation)."""
    out, skipped = [], {}
    for src in cfg.repair.sources:
        label = source_label(src)
        if src == "base":
            out.append({"source": src, "label": label, "model": "base", "dir": model_dirs["base"], "key": keys["base"],
                        "scores": None})
        elif src == "sft_peak_ood":
            peak, final = peaks[damaged], cfg.methods[damaged].steps
            if peak["step"] == final:
                skipped[label] = (f"{damaged}'s best OOD accuracy ({peak['ood_acc']:.3f}) is its final model (step "
                                  f"{final}): nothing to restore")
                continue
            out.append({"source": src, "label": label, "model": f"{damaged}@step-{peak['step']}",
                        "dir": run.method(damaged) / "checkpoints" / f"step-{peak['step']}",
                        "key": config_hash({"from": keys[damaged], "step": peak["step"]}),
                        "scores": {"id_acc": peak["id_acc"], "ood_acc": peak["ood_acc"]}})
        else:
            d = Path(src)
            key = config_hash({"path": str(d)})
            out.append({"source": src, "label": label, "model": str(d), "dir": d, "key": key, "scores": None,
                        "eval_name": f"repair-source-{label}", "eval_key": key})
    return out, skipped


def repair_sweep(cfg: StudyConfig, damaged: str, run: Run, tasks: dict[str, Task], problem_sets: dict[str, list[Problem]],
                 evals: dict[str, dict], model_dirs: dict[str, Path], keys: dict[str, str], eval_key: str,
                 device: str, say: Callable[[str], None], *, peaks: dict[str, dict] | None = None,
                 evaluate: Callable[[str, Path, str], dict] | None = None) -> tuple[dict, dict]:
    """Repair the damaged method's model with every grid point from every source (`repair.source`);
    greedy-evaluate each on the in-domain, OOD and retention sets (sampling is skipped: the curves
    need accuracies only). `ood_recovered_frac` is measured against the source actually used unless
    `repair.reference` names a model; `id_kept_frac` always against the pretrained base.

    Returns ({name: entry}, {label: {source, model, id_acc, ood_acc} or {source, skipped: why}}); with
    several sources every name ends in "@<source label>" and the repaired models sit under
    repair/<label>/<name>/."""
    from posttrain.evaluation.evaluate import evaluate_model
    from posttrain.models.loading import load_model
    from posttrain.repair.sweep import expand_grid, run_repair_sweep

    rep = cfg.repair
    greedy = cfg.eval.model_copy(update={"n_sampled_problems": 0})
    retention_keys = [r.key for r in cfg.retention]

    def summary(scores: dict) -> dict:
        ret = {k: scores[k]["acc"] for k in retention_keys}
        return {"id_acc": scores[cfg.id_task.key]["acc"], "ood_acc": scores[cfg.ood_task.key]["acc"],
                "id_n": scores[cfg.id_task.key].get("n"), "ood_n": scores[cfg.ood_task.key].get("n"),
                "retention": ret, "retention_mean": sum(ret.values()) / max(len(ret), 1)}

    def evaluate_fn(model_dir: Path) -> dict:
        model, tok = load_model(model_dir, device=device, **cfg.load_options)
        scores = evaluate_model(model, tok, tasks, problem_sets, greedy, cfg.seed)
        return summary({**scores, **evaluate_lm_eval_refs(model, tok, cfg.lm_eval_retention, cfg.seed)})

    sources, skipped = repair_sources(cfg, damaged, run, model_dirs, keys, peaks or {}, evaluate)
    info: dict[str, dict] = {}
    for label, why in skipped.items():
        say(f"repair sweep from {label}: skipped, {why}")
        info[label] = {"source": label, "skipped": why}
    multi = len(rep.sources) > 1
    n = len(expand_grid(rep.grid))
    out: dict = {}
    for src in sources:
        if src["source"] == "base":
            src["scores"] = summary(evals["base"])
        elif src["scores"] is None:  # a directory: evaluated once, cached like every model of the study
            if evaluate is None:
                raise ValueError("repair_sweep needs `evaluate` to score a directory source")
            src["scores"] = summary(evaluate(src["eval_name"], src["dir"], src["eval_key"]))
        info[src["label"]] = {"source": src["source"], "model": src["model"], "id_acc": src["scores"]["id_acc"],
                              "ood_acc": src["scores"]["ood_acc"]}
        if rep.reference == "source":
            ref_scores, ref_dir, ref_key = src["scores"], src["dir"], src["key"]
        else:
            ref_scores, ref_dir, ref_key = summary(evals[rep.reference]), model_dirs[rep.reference], keys[rep.reference]
        anchors = {"base": summary(evals["base"]), "damaged": summary(evals[damaged]), "reference": ref_scores}
        ref_name = src["model"] if rep.reference == "source" else rep.reference
        say(f"repair sweep: {n} repairs of {damaged} from {src['model']} (reference {ref_name})")
        key = config_hash({"eval": eval_key, "damaged": keys[damaged], "source": src["key"], "reference": ref_key})
        got = run_repair_sweep(src["dir"], model_dirs[damaged], ref_dir,
                               run.root / "repair" / (src["label"] if multi else ""), rep.grid, evaluate_fn,
                               anchors=anchors, eval_key=key, device="cpu", log=lambda msg: say(f"  {msg}"))
        for name, entry in got.items():
            path = Path(entry["path"])  # relative to the run directory, so a moved run stays readable
            if path.is_relative_to(run.root):
                entry["path"] = str(path.relative_to(run.root))
            entry.update(source=src["source"], source_model=src["model"], reference=ref_name,
                         reference_ood_acc=ref_scores["ood_acc"])
            out[f"{name}@{src['label']}" if multi else name] = entry
    return out, info
