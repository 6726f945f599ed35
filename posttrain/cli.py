"""The `posttrain` command line. Exit codes: 0 ok, 2 bad input (one-line message), 1 internal error."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from posttrain.errors import TrainingDiverged, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Study and steer how post-training changes a language model.")

SET_HELP = "Override any config field, e.g. --set pretrain.steps=300 (repeatable)."
DEVICE_HELP = "auto, cpu, cuda or cuda:N."
PICKLE_HELP = ("Read pickle-only checkpoints (pytorch_model.bin) as plain tensors with torch.load(weights_only=True); "
               "refused without it.")


def _device(device: str) -> str:
    """Every command's --device, checked before any work (one resolver: posttrain.devices)."""
    from posttrain.devices import device_name

    return device_name(device)


def _pickles(allow: bool):
    from posttrain.analysis.checkpoints import pickle_allowed

    return pickle_allowed(allow)


def _study_config(config: Path | None, preset: str | None, overrides: list[str], task_specs: list[Path] = ()):
    from posttrain.config import build_study_config, preset_path, read_study_yaml

    data = read_study_yaml(config if config is not None else preset_path(preset or "default"))
    if task_specs:
        from posttrain.tasks.spec import spec_name

        data["tasks"] = {**(data.get("tasks") or {}), **{spec_name(p): str(p) for p in task_specs}}
    return build_study_config(data, overrides)


SEEDS_HELP = ("Run the whole study once per seed, e.g. --seeds 0,1,2, under OUT/seed-<n>/, and aggregate them in "
              "OUT/results.json (config field `seeds`).")


JOBS_HELP = ("Processes that run the seeds side by side, each with cores/jobs threads, or auto (one per seed up to "
             "twice the CPU cores; 1 on a GPU). Results do not depend on it (config field `jobs`).")


def _jobs_override(jobs: str | None) -> list[str]:
    return [] if jobs is None else [f"jobs={jobs}"]


def _seed_overrides(seed: int | None, seeds: str | None) -> list[str]:
    if seeds is None:
        return [f"seed={seed}"] if seed is not None else []
    if seed is not None:
        raise UserError("--seed and --seeds exclude each other")
    try:
        values = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds expects comma-separated integers (e.g. 0,1,2), got {seeds!r}") from None
    if not values:
        raise UserError("--seeds names no seed (e.g. --seeds 0,1,2)")
    return [f"seeds={values}"]


def _check_seed(cfg, seed: int | None) -> None:
    if seed is not None and cfg.seeds:
        raise UserError(f"--seed does not apply: the config lists seeds {cfg.seeds} (use --seeds to change them)")


@app.command()
def demo(
    preset: str = typer.Option("default", help="Embedded study preset: quick (CI, ~1 min) or default (~5 min)."),
    out: Path = typer.Option(Path("runs/demo"), help="Run directory (stages already done there are reused)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the study (config field `seed`)."),
    seeds: Optional[str] = typer.Option(None, help=SEEDS_HELP),
    jobs: Optional[str] = typer.Option(None, help=JOBS_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Run the embedded default study end to end: pretrain, SFT vs GRPO, evaluate, diff, report."""
    from posttrain.study_sweep import run_config

    device = _device(device)
    cfg = _study_config(None, preset, [*set_, *_seed_overrides(seed, seeds), *_jobs_override(jobs)])
    _check_seed(cfg, seed)
    run_config(cfg, out, resume=True, device=device)


@app.command()
def study(
    config: Path = typer.Argument(..., help="Study YAML (see configs/)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default runs/<study name>)."),
    resume: bool = typer.Option(False, help="Continue a run directory, reusing finished stages."),
    seed: Optional[int] = typer.Option(None, help="Seed of the study (config field `seed`)."),
    seeds: Optional[str] = typer.Option(None, help=SEEDS_HELP),
    jobs: Optional[str] = typer.Option(None, help=JOBS_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
) -> None:
    """Run a whole study from a YAML config; several seeds with `seeds:`, a sweep with `sweep:`."""
    from posttrain.config import plain_name
    from posttrain.study_sweep import run_config

    device = _device(device)
    cfg = _study_config(config, None, [*set_, *_seed_overrides(seed, seeds), *_jobs_override(jobs)])
    _check_seed(cfg, seed)
    if out is None and not plain_name(cfg.name):
        raise UserError(f"study name {cfg.name!r} (in {config}) is not a plain directory name, so runs/<name> would "
                        "not be a directory of runs/; rename the study or pass --out")
    with _pickles(allow_pickle):
        run_config(cfg, out or Path("runs") / cfg.name, resume=resume, device=device)


@app.command()
def pretrain(
    config: Path = typer.Argument(..., help="Study YAML; its model, world and pretrain sections are used."),
    out: Path = typer.Option(..., help="Directory for the base checkpoint (out/base) and metrics (out/pretrain)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Pretrain a tiny model from scratch on the config's task mixture."""
    from posttrain.study import build_tasks
    from posttrain.train.pretrain import pretrain as run_pretrain

    device = _device(device)
    cfg = _study_config(config, None, list(set_))
    if (out / "base").exists():
        raise UserError(f"{out / 'base'} exists; choose another --out")
    path = run_pretrain(cfg.model, cfg.pretrain, build_tasks(cfg), out / "pretrain", out / "base", cfg.seed, device=device)
    typer.echo(str(path))


@app.command()
def train(
    config: Path = typer.Argument(..., help="Study YAML holding the method under `methods`."),
    method: str = typer.Option(..., help="Name of the method in the config's `methods`."),
    base: Path = typer.Option(..., help="Checkpoint to start from (and the KL reference)."),
    out: Path = typer.Option(..., help="Output directory (model/, metrics.jsonl, checkpoints/)."),
    expert_format: Optional[str] = typer.Option(None, help="Solution format of expert demos (overrides the method's)."),
    resume: bool = typer.Option(False, help="Continue from the latest checkpoint in --out (bitwise identical result)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
) -> None:
    """Post-train one model with one method of a config: sft, grpo, ppo, rloo, ei, self_sft, ..."""
    from posttrain.models.hub import resolve_checkpoint

    device = _device(device)
    cfg = _study_config(config, None, list(set_))
    if method not in cfg.methods:
        raise UserError(f"method {method!r} is not in {config} (has: {', '.join(cfg.methods)})")
    m = cfg.methods[method]
    base = resolve_checkpoint(base, "--base")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; train writes a directory")
    if (out / "model").exists() and (out / "train.json").is_file():
        raise UserError(f"{out / 'model'} exists: that run is finished; choose another --out")
    if not resume and out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty (an unfinished run?); pass --resume to continue it "
                        "or choose another --out")
    with _pickles(allow_pickle):
        _train(cfg, m, method, base, out, expert_format, resume, device)


def _train(cfg, m, method: str, base: Path, out: Path, expert_format: str | None, resume: bool, device: str) -> None:
    from pydantic import ValidationError

    from posttrain.study import build_tasks
    from posttrain.train.loop import train as run_train

    task = build_tasks(cfg)[m.task]
    if expert_format is not None:  # validated against the method's data source like a --set
        from posttrain.config import TrainConfig, format_validation_error

        try:
            m = TrainConfig.model_validate({**m.model_dump(), "expert_format": expert_format})
        except ValidationError as e:
            raise UserError(format_validation_error(e).replace("config: ", f"config: methods.{method}: ", 1)) from None
    from posttrain.study import base_format_shares, expert_format_for

    fmt = expert_format_for(m, task, lambda: base_format_shares(cfg, task, m.split, base, device))
    if fmt is not None and m.data_params.expert_format is None:
        typer.echo(f"expert format: {fmt} (the one the base writes least)", err=True)
    res = run_train(m, init_dir=base, ref_dir=base, out_dir=out, task=task, expert_format=fmt,
                    seed=cfg.seed if m.seed is None else m.seed, device=device, resume=resume,
                    on_step=_train_progress(m.steps), method=method, load_options=cfg.load_options)
    from posttrain.train.distributed import is_main

    if is_main():  # under accelerate launch / torchrun the other processes say nothing
        typer.echo(f"trained {res.trainable_params:,} of {res.total_params:,} parameters in {res.wall_seconds:.0f}s",
                   err=True)
        typer.echo(str(res.model_dir))


def _train_progress(total: int):
    from posttrain.progress import progress_logger

    return progress_logger(lambda msg: typer.echo(f"posttrain {msg}", err=True), "train", total)


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="Checkpoint directory."),
    tasks: List[str] = typer.Option(["points24/id,points24/ood,facts/id"],
                                    help="task/split keys, comma-separated and/or repeated."),
    config: Optional[Path] = typer.Option(None, help="Study YAML for task parameters and eval settings."),
    task_spec: List[Path] = typer.Option([], "--task-spec", help="A dataset task YAML (repeatable), named by its "
                                         "`name:` or file name: --task-spec configs/tasks/gsm8k.yaml --tasks gsm8k/id."),
    out: Optional[Path] = typer.Option(None, help="Write the scores as JSON here (must not exist unless --overwrite)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("fp32", help="auto (the checkpoint's), fp32, bf16 or fp16."),
    chat_template: str = typer.Option("auto", help="auto (prompts as a user turn of the tokenizer's chat template, "
                                      "when it has one) or none (prompts as they are)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Run the checkpoint's own modelling code (only for code you trust)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
) -> None:
    """Evaluate one checkpoint on task splits (greedy accuracy, pass@k, format shares)."""
    import json

    device = _device(device)
    if out is not None:
        if out.is_dir():
            raise UserError(f"--out {out} is a directory; eval writes one JSON file")
        if out.exists() and not overwrite:
            raise UserError(f"--out {out} exists; pass --overwrite to replace it")
    cfg = _study_config(config, None if config else "default", list(set_), list(task_spec))
    # after the cheap checks: these import transformers (seconds)
    from posttrain.evaluation.evaluate import eval_problems, evaluate_model
    from posttrain.io import atomic_write_json
    from posttrain.models.loading import check_generation_fits, load_model

    keys = list(dict.fromkeys(k.strip() for t in tasks for k in t.split(",") if k.strip()))
    if not keys:
        raise UserError("--tasks names no task/split (e.g. --tasks points24/id,facts/id)")
    objs, sets = {}, {}
    for key in keys:
        name, _, split = key.partition("/")
        split = split or "id"
        if name not in objs:
            objs[name] = cfg.make_task(name)
        objs[name].check_split(split)
        sets[f"{name}/{split}"] = eval_problems(objs[name], split, cfg.eval.n_per_split, cfg.seed)
    mdl, tok = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                          chat_template=chat_template)
    check_generation_fits(mdl, tok, [p.prompt for ps in sets.values() for p in ps], cfg.eval.max_new_tokens,
                          "eval.max_new_tokens")
    scores = evaluate_model(mdl, tok, objs, sets, cfg.eval, cfg.seed)
    if out:
        atomic_write_json(out, scores)
    summary = {k: {"acc": v["acc"], "malformed": v["malformed"], **({"pass_at_k": v["pass_at_k"]} if "pass_at_k" in v else {})}
               for k, v in scores.items()}
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def diff(
    base: Path = typer.Argument(..., help="Base checkpoint directory (or .safetensors file)."),
    others: List[Path] = typer.Argument(..., help="One or more fine-tuned checkpoints (with --trajectory: run, "
                                        "method or checkpoints directories holding step-<N>/ checkpoints)."),
    out: Path = typer.Option(..., help="Output directory for diff.json, tables (CSV/parquet) and plots."),
    spectral: bool = typer.Option(False, "--spectral", help="Also singular values, principal angles, energy split, "
                                  "ranks and ESD alpha of every 2-D weight."),
    esd: bool = typer.Option(False, "--esd", help="Only singular values: spectrum changes and WeightWatcher-style "
                             "ESD summaries (alpha, stable rank) of every 2-D weight; implied by --spectral."),
    rank: Optional[int] = typer.Option(None, help="Top-k size; also switches large matrices to a truncated "
                                       "randomised SVD of this rank (top-k metrics only)."),
    top_frac: Optional[float] = typer.Option(None, help="Top-k as a fraction of min(m, n) (default 0.05); also "
                                             "switches large matrices to a truncated randomised SVD."),
    svd: str = typer.Option("auto", help="auto, full (LAPACK SVD of every matrix that fits in memory, never "
                            "truncated) or randomized."),
    svd_dtype: str = typer.Option("auto", help="auto (float64 up to 2^18 entries, else float32), float32 or float64."),
    bins: int = typer.Option(20, help="Spectrum ranges of the principal-angle curves."),
    tol: float = typer.Option(1e-5, help="|dW_ij| above this counts as a changed entry (update sparsity)."),
    pair: List[str] = typer.Option([], "--pair", help="Compare the updates of two models, A:B (repeatable; default "
                                   "all pairs of 2 to 6 models)."),
    trajectory: bool = typer.Option(False, "--trajectory", help="Diagnostics over each run's checkpoint sequence."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto (computes there when available)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs of an earlier diff in --out."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=PICKLE_HELP),
) -> None:
    """Where and how did fine-tuning change the weights? Streamed tensor by tensor, any HF safetensors checkpoints."""
    from posttrain.analysis.diff import diff as run_diff
    from posttrain.analysis.diff import model_names
    from posttrain.progress import enabled_by_default

    dev = _device(device)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; diff writes a directory")
    done = [out / f for f in ("diff.json", "trajectory.json") if (out / f).exists()]
    if done and not overwrite:
        # diff.json is written last, so a directory without it holds an interrupted diff, redone freely
        raise UserError(f"--out {out} already holds a finished diff ({done[0].name}); pass --overwrite to replace it "
                        "or choose another --out")
    pairs = None
    if pair:
        pairs = []
        for p in pair:
            a, sep, b = p.partition(":")
            if not sep or not a or not b:
                raise UserError(f"--pair expects A:B (two model names), got {p!r}")
            pairs.append((a, b))
    kw = dict(spectral=spectral, esd=esd, rank=rank, top_frac=top_frac, svd=svd, svd_dtype=svd_dtype, bins=bins, tol=tol,
              device=dev, plots=plots, show_progress=enabled_by_default())
    if trajectory:
        from posttrain.analysis.trajectory import trajectory as run_trajectory

        if pairs is not None:
            raise UserError("--pair does not apply with --trajectory (consecutive checkpoints are compared)")
        with _pickles(allow_pickle):
            tr = run_trajectory(base, list(others), out, **kw)
        for run in dict.fromkeys(p["run"] for p in tr.points):
            pts = [p for p in tr.points if p["run"] == run]
            typer.echo(f"{run}: {len(pts)} checkpoints, steps {pts[0]['step']}..{pts[-1]['step']}; "
                       f"rel. update {pts[0]['rel_update_total']:.3e} -> {pts[-1]['rel_update_total']:.3e}")
        typer.echo(f"wrote {out / 'trajectory.json'}")
        return
    with _pickles(allow_pickle):
        res = run_diff(base, model_names(list(others)), out, compare_pairs="auto" if pairs is None else pairs, **kw)
    for name, s in res.summaries.items():
        top = sorted(s.rel_update_by_module.items(), key=lambda kv: -kv[1])[:3]
        line = (f"{name}: total rel. update {s.rel_update_total:.3e}; top modules "
                + ", ".join(f"{m} {v:.3e}" for m, v in top)
                + f"; changed entries {s.changed_frac:.1%}")
        if s.has_spectral and spectral:
            line += f"; top-k principal angle {s.principal_angle_top:.3g} deg"
        if s.has_spectral:
            line += f"; top-k singular-value change {s.sv_rel_change_top:.3g}"
        if s.nonfinite:
            line += f"; NON-FINITE tensors: {', '.join(s.nonfinite[:5])}"
        typer.echo(line)
    for (a, b), p in res.pairs.items():
        cos = p.cosine_total
        shown = f"{cos:.3f}" if cos is not None and math.isfinite(cos) else "undefined (an update is exactly zero)"
        typer.echo(f"{a} vs {b}: cosine of the updates {shown}")
    typer.echo(f"wrote {out / 'diff.json'}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A study's, multi-seed study's or sweep's run directory.")) -> None:
    """(Re)write RUN_DIR/report.html from RUN_DIR/results.json (or a sweep's sweep.json)."""
    from posttrain.report.html import write_report

    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    typer.echo(str(write_report(run_dir)))


# ------------------------------------------------------------------------------------------------
# posttrain repair ...

repair_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                         help="Cheap repairs of fine-tuning damage; each writes a complete HF checkpoint.")
app.add_typer(repair_app, name="repair")


def _run_repair(method: str, base: Path, targets: list[Path], out: Path, overwrite: bool, device: str,
                params: dict, allow_pickle: bool = False) -> None:
    from posttrain.repair import get_repair, write_repair

    device = _device(device)
    repair = get_repair(method, **{k: v for k, v in params.items() if v is not None})
    with _pickles(allow_pickle):
        rec = write_repair(repair, base, targets, out, overwrite=overwrite, device=device)
    n = rec["n_tensors"]
    typer.echo(f"{method}: repaired {n['repaired']} of {n['repaired'] + n['copied']} tensors "
               f"({rec['selection']['description']})", err=True)
    typer.echo(str(out))


def _repair_command(cls) -> None:
    """`posttrain repair <name>` for a registered repair, its options generated from the repair's
    declared `Params` and the shared `Selection` (types, defaults and help text come from there).

    A field may carry `json_schema_extra={"cli_flags": {"--flag": value, ...}}` (each flag sets the
    field to that value; flags exclude each other) or `{"cli_name": "--name"}`; a bool field is
    `--x/--no-x` whatever its default, so a command line can state either value explicitly.
    """
    import inspect
    import typing

    from posttrain.repair.base import SELECTION, is_list_param, param_types

    kw = inspect.Parameter.KEYWORD_ONLY
    sig = [inspect.Parameter("base", kw, annotation=Path, default=typer.Option(
               ..., "--base", help="The model to restore from (usually the pre-fine-tuning base).")),
           inspect.Parameter("target", kw, annotation=List[Path] if cls.multi_target else Path, default=typer.Option(
               ..., "--target", help="The fine-tuned (damaged) checkpoint; its config, tokenizer and sharding are kept"
               + (" (repeatable)." if cls.multi_target else ".")))]
    flags: dict[str, tuple[str, object]] = {}  # python name -> (field, value)
    for name, field in {**cls.Params.model_fields, **SELECTION}.items():
        extra = field.json_schema_extra or {}
        help_ = field.description or ""
        if "cli_flags" in extra:
            for flag, value in extra["cli_flags"].items():
                var = flag.lstrip("-").replace("-", "_")
                flags[var] = (name, value)
                sig.append(inspect.Parameter(var, kw, annotation=bool, default=typer.Option(
                    False, flag, help=f"Set {name} to {value!r}. " + help_)))
            continue
        decl = extra.get("cli_name", "--" + name.replace("_", "-"))
        if bool in param_types(field):
            decl = f"{decl}/--no-{decl[2:]}"
            ann, default = bool, bool(field.default)
        elif is_list_param(field):
            inner = float if "float" in str(field.annotation) else str
            ann, default = List[inner], []
        elif typing.get_origin(field.annotation) is typing.Literal or "Literal" in str(field.annotation):
            ann, default = Optional[str], None
        elif "float" in str(field.annotation):
            ann, default = Optional[float], None
        else:
            ann, default = Optional[str], None
        required = field.is_required()
        shown = None if required or field.default is None else field.default
        sig.append(inspect.Parameter(name, kw, annotation=ann, default=typer.Option(
            ... if required else default, decl, help=help_, show_default=shown is not None and str(shown))))
    sig += [inspect.Parameter("out", kw, annotation=Path, default=typer.Option(
                ..., "--out", help="Output checkpoint directory (must not exist unless --overwrite).")),
            inspect.Parameter("overwrite", kw, annotation=bool, default=typer.Option(
                False, "--overwrite", help="Replace --out if it is an earlier repair output.")),
            inspect.Parameter("device", kw, annotation=str, default=typer.Option(
                "cpu", help="Where the computation runs: cpu, cuda, cuda:N or auto.")),
            inspect.Parameter("allow_pickle", kw, annotation=bool, default=typer.Option(
                False, "--allow-pickle", help=PICKLE_HELP))]

    def command(**kw_args) -> None:
        chosen = [f for f in flags if kw_args.pop(f)]
        if len(chosen) > 1:
            raise UserError(" and ".join("--" + f.replace("_", "-") for f in chosen) + " exclude each other")
        base, target, out = kw_args.pop("base"), kw_args.pop("target"), kw_args.pop("out")
        overwrite, device, allow_pickle = kw_args.pop("overwrite"), kw_args.pop("device"), kw_args.pop("allow_pickle")
        params = {k: v for k, v in kw_args.items() if v not in (None, [], False) or k in cls.Params.model_fields}
        params = {k: (v or None) if isinstance(v, list) else v for k, v in params.items()}
        for f in chosen:
            field, value = flags[f]
            params[field] = value
        targets = list(target) if cls.multi_target else [target]
        _run_repair(cls.name, base, targets, out, overwrite, device, params, allow_pickle)

    command.__signature__ = inspect.Signature(sig)
    command.__doc__ = cls.help or " ".join((cls.__doc__ or cls.name).strip().split("\n\n")[0].split())
    repair_app.command(cls.name.replace("_", "-"))(command)


def _register_repair_commands() -> None:
    from posttrain.repair import REPAIRS

    for cls in REPAIRS.values():
        _repair_command(cls)


_register_repair_commands()


def _check_launch() -> None:
    """Only `train` shares its work among the processes of `accelerate launch` / `torchrun`; any
    other command started N times would do its work N times over the same outputs."""
    from posttrain.train.relaunch import relaunch_if_accelerate_cpu

    cmd = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    relaunch_if_accelerate_cpu(cmd)
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        if cmd not in (None, "train"):
            raise UserError(f"`posttrain {cmd}` runs in one process; of the commands only `posttrain train` "
                            "runs under accelerate launch / torchrun")


def main() -> None:
    try:
        _check_launch()
        rv = app(standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except TrainingDiverged as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        # usage errors come from click, or from the copy of click that recent typer vendors
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            typer.echo("aborted", err=True)
            sys.exit(1)
        if os.environ.get("POSTTRAIN_DEBUG"):
            raise
        typer.echo(f"internal error: {type(e).__name__}: {e} (set POSTTRAIN_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
