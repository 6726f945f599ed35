"""A study over several seeds: each seed is a complete single-seed run under `<out>/seed-<n>/`
(its own pretraining, cached stage by stage like any run), and `<out>/results.json` aggregates them
(`posttrain.aggregate`): every metric as {mean, sd, ci95, values}, findings by the multi-seed rule
with `held_in`.

Run directories come in three layouts, and one never turns into another (that would overwrite a
finished run's results.json): a single run (`.stages/`, `results.json` with one `seed`), several seeds
(`seed-<n>/`, `results.json` of kind "seeds") and a sweep (`cells/`, `sweep.json`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape

from posttrain.config import StudyConfig, dump_yaml
from posttrain.errors import UserError
from posttrain.io import atomic_write_json, atomic_write_text, read_json, versions

console = Console(stderr=True, soft_wrap=True)

Log = Callable[[str], None]
# called with (the seed's config, its run directory) before that run starts (a sweep uses it to
# start a run from an identical, already pretrained base)
Prepare = Callable[[StudyConfig, Path], None]

LAYOUTS = {"single": "a single-seed study", "seeds": "a multi-seed study", "sweep": "a sweep"}


def default_log(prefix: str = "") -> Log:
    # messages carry "[seed 1]" / "[kl_coef=0.01]" tags, which rich would take for markup
    return lambda msg: console.print(f"[bold cyan]posttrain[/] {escape(prefix + msg)}")


def layout_of(root: Path) -> str | None:
    """Which kind of run directory `root` holds (None: empty or not a run directory)."""
    if (root / "sweep.json").is_file() or (root / "cells").is_dir():
        return "sweep"
    if any(p.is_dir() for p in root.glob("seed-*")):
        return "seeds"
    if (root / ".stages").is_dir() or (root / "results.json").is_file():
        return "single"
    return None


def claim_root(root: Path, kind: str, resume: bool) -> None:
    """Check that `root` may receive a run of `kind`: empty, or (with `resume`) a run of the same kind."""
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} exists and is not a directory; choose another --out")
    if root.exists() and any(root.iterdir()):
        if not resume:
            raise UserError(f"{root} exists and is not empty; pass --resume to continue it or choose another --out")
        found = layout_of(root)
        if found is not None and found != kind:
            raise UserError(f"{root} holds {LAYOUTS[found]}, not {LAYOUTS[kind]}; choose another --out")
    root.mkdir(parents=True, exist_ok=True)


def seed_config(cfg: StudyConfig, seed: int) -> StudyConfig:
    """The single-seed study that seed `seed` of a multi-seed study runs."""
    return cfg.model_copy(update={"seed": seed, "seeds": None, "sweep": None})


def run_single(cfg: StudyConfig, root: Path, device: str, log: Log, prepare: Prepare | None = None) -> dict:
    """One seed into `root` (the root already claimed): today's single-seed layout."""
    from posttrain.study import run_study

    if prepare is not None:
        prepare(cfg, root)
    # the directory was claimed by the caller: resuming a fresh directory is a fresh run
    return run_study(cfg, root, resume=True, device=device, log=log)


def run_seeds(cfg: StudyConfig, out: str | Path, resume: bool = False, device: str = "auto", log: Log | None = None,
              prepare: Prepare | None = None, claimed: bool = False) -> dict:
    """Every seed of `cfg.seeds` under `<out>/seed-<n>/`, then the aggregated `<out>/results.json` and
    `<out>/report.html`; returns the aggregated results."""
    from posttrain.aggregate import aggregate_results
    from posttrain.report.html import write_report

    if not cfg.seeds:
        raise UserError("a multi-seed study needs `seeds` (e.g. --seeds 0,1,2)")
    t0 = time.time()
    root = Path(out)
    if not claimed:
        claim_root(root, "seeds", resume)
    say = log or default_log()
    atomic_write_text(root / "config.yaml", dump_yaml(cfg))
    atomic_write_json(root / "versions.json", versions())
    per_seed, paths = {}, {}
    jobs = seed_jobs(cfg, device)
    for seed in cfg.seeds:
        (root / f"seed-{seed}").mkdir(parents=True, exist_ok=True)
        paths[seed] = f"seed-{seed}"
    if jobs > 1:
        say(f"{len(cfg.seeds)} seeds in {jobs} processes, {threads_per_job(jobs)} thread(s) each")
        per_seed = _run_parallel(cfg, root, device, prepare, jobs)
    else:
        for i, seed in enumerate(cfg.seeds):
            say(f"seed {seed} ({i + 1} of {len(cfg.seeds)})")
            per_seed[seed] = run_single(seed_config(cfg, seed), root / paths[seed], device,
                                        lambda m, s=seed: say(f"[seed {s}] {m}"), prepare)
    results = aggregate_results(per_seed, paths)
    # wall_seconds sums the seeds' own times; with seeds side by side the study took less
    results.update(jobs=jobs, elapsed_seconds=round(time.time() - t0, 2))
    atomic_write_json(root / "results.json", results)
    write_report(root)
    say(f"{len(per_seed)} seeds done in {time.time() - t0:.0f}s: {root / 'results.json'} and {root / 'report.html'}")
    return results


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def seed_jobs(cfg: StudyConfig, device: str) -> int:
    """How many seeds run side by side: `cfg.jobs`, or with "auto" on CPU one per seed up to twice the
    CPU cores (tiny models use a second thread poorly, a second process well; 3 seeds on 2 cores
    finish together in about 1.5 single-seed times, where 2 + 1 would take 2), one on an accelerator."""
    n = len(cfg.seeds or [])
    if cfg.jobs != "auto":
        return max(1, min(int(cfg.jobs), n))
    from posttrain.devices import device_name

    if device_name(device) != "cpu":
        return 1
    return max(1, min(n, 2 * cpu_cores()))


def threads_per_job(jobs: int) -> int:
    return max(1, cpu_cores() // jobs)


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:  # die with the parent (a SIGKILLed study must not leave seeds writing behind it)
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _seed_job(cfg: StudyConfig, seed: int, run_dir: Path, device: str, prepare: Prepare | None) -> dict:
    return run_single(seed_config(cfg, seed), run_dir, device, default_log(f"[seed {seed}] "), prepare)


def _run_parallel(cfg: StudyConfig, root: Path, device: str, prepare: Prepare | None, jobs: int) -> dict[int, dict]:
    """Every seed in its own spawned process (`jobs` at a time); the first error is raised as is."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                             initargs=(threads_per_job(jobs),)) as pool:
        futures = {s: pool.submit(_seed_job, cfg, s, root / f"seed-{s}", device, prepare) for s in cfg.seeds}
        try:
            return {s: f.result() for s, f in futures.items()}
        except BrokenProcessPool:
            raise UserError(f"a seed's process under {root} died (killed or out of memory); "
                            "rerun with --resume to continue") from None
        except BaseException:
            for f in futures.values():
                f.cancel()
            raise


def run_cell(cfg: StudyConfig, root: Path, device: str, log: Log, prepare: Prepare | None = None) -> dict:
    """A study into a directory already claimed for it: several seeds when `cfg.seeds`, else one."""
    root.mkdir(parents=True, exist_ok=True)
    if cfg.seeds:
        return run_seeds(cfg, root, device=device, log=log, prepare=prepare, claimed=True)
    return run_single(cfg, root, device, log, prepare)


def load_seed_results(root: Path) -> dict[int, dict]:
    """Each seed's results.json of a multi-seed run directory (as listed in its aggregated results)."""
    res = read_json(root / "results.json")
    return {int(s): read_json(root / rel / "results.json") for s, rel in res.get("runs", {}).items()
            if (root / rel / "results.json").is_file()}
