"""Wall time and peak memory of `posttrain diff --spectral` on a Qwen2.5-0.5B-shaped pair, next to the
bare SVDs of the same matrices and WeightWatcher's `analyze()`.

    python bench/diff_bench.py                     # full Qwen2.5-0.5B shapes (24 layers), ~2 GB of checkpoints
    python bench/diff_bench.py --threads 1         # pin torch / BLAS threads (all runs alike)
    python bench/diff_bench.py --layers 2 --keep   # a quick look; keep the checkpoints in bench/out/diff_bench
    pip install weightwatcher                      # optional: adds the WeightWatcher comparison

What is measured, each in its own subprocess so peak RSS (ru_maxrss of that process) is its own:
1. `posttrain diff BASE FT --out ... --spectral` (the CLI, default settings): wall time, peak RSS.
2. The bare SVDs: torch.linalg.svd(W, full_matrices=False) in float32 of every 2-D weight of both
   checkpoints, timed around the call only (reading and casting not counted). Two totals: "as
   stored" (wide matrices decomposed wide, as a naive script would) and "tall" (each matrix in its
   faster orientation, the strict baseline). The embedding is also reported on its own because diff
   analyses it through its Gram matrix (see posttrain/analysis/factors.py).
3. WeightWatcher `analyze()` (defaults) on each checkpoint directory, and the agreement of its
   per-layer power-law alpha with diff's `alpha_base` / `alpha_ft`.

The checkpoints are random (std 0.02 normal, the HF initialiser) in bfloat16, sharded with an index,
with the real Qwen2.5-0.5B tensor names and shapes (tied embeddings, so no lm_head). The fine-tuned
one adds to every 2-D weight a planted rank-8 update of relative Frobenius norm 0.01. They are
written under bench/out/diff_bench/ and deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

QWEN05 = {"hidden": 896, "intermediate": 4864, "layers": 24, "kv_dim": 128, "vocab": 151936}


def qwen_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv = cfg["hidden"], cfg["intermediate"], cfg["kv_dim"]
    out = [("model.embed_tokens.weight", (cfg["vocab"], h))]
    for L in range(cfg["layers"]):
        p = f"model.layers.{L}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out.append(("model.norm.weight", (h,)))
    return out


def build(root: Path, cfg: dict, seed: int = 0, shard_bytes: int = 500 * 2**20) -> tuple[Path, Path]:
    """Write base/ and ft/ (bf16, sharded with model.safetensors.index.json) one shard at a time."""
    import torch
    from safetensors.torch import save_file

    base, ft = root / "base", root / "ft"
    for d in (base, ft):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = qwen_tensors(cfg)
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    maps = {base: {}, ft: {}}
    for s, group in enumerate(shards):
        fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tb, tf = {}, {}
        for name, shape in group:
            if len(shape) == 1:
                w = torch.ones(shape) if "norm" in name else torch.zeros(shape)
                tb[name], tf[name] = w.bfloat16(), w.bfloat16()
                continue
            w = torch.randn(shape, generator=g) * 0.02
            a = torch.randn(shape[0], 8, generator=g)
            b = torch.randn(8, shape[1], generator=g)
            delta = a @ b
            delta *= 0.01 * w.norm() / delta.norm()
            tb[name] = w.bfloat16()
            tf[name] = (w + delta).bfloat16()
            del w, a, b, delta
        save_file(tb, str(base / fname), metadata={"format": "pt"})
        save_file(tf, str(ft / fname), metadata={"format": "pt"})
        for name in tb:
            maps[base][name] = fname
            maps[ft][name] = fname
        del tb, tf
    for d in (base, ft):
        total = sum(2 * math.prod(s) for _, s in tensors)
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": maps[d]}, indent=1))
        (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": cfg["hidden"],
                                                   "intermediate_size": cfg["intermediate"],
                                                   "num_hidden_layers": cfg["layers"], "vocab_size": cfg["vocab"],
                                                   "tie_word_embeddings": True, "torch_dtype": "bfloat16"}))
    return base, ft


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Run `cmd`: wall seconds, peak RSS (MiB) of that process alone, and its stdout.

    The peak is the child's VmHWM, polled from /proc while it runs (VmHWM only grows, so the last
    reading is the peak up to ~20 ms before exit). ru_maxrss is not used: Linux carries the parent's
    high-water mark over fork+exec into it.
    """
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    chunks: dict[str, bytes] = {}
    peak = [0]

    def drain(key, stream):
        chunks[key] = stream.read()

    def poll():
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    threads = [threading.Thread(target=drain, args=(k, s)) for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    threads.append(threading.Thread(target=poll))
    for t in threads:
        t.start()
    proc.wait()
    wall = time.perf_counter() - t0
    for t in threads:
        t.join()
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{chunks['err'].decode()[-3000:]}")
    return wall, peak[0] / 1024, chunks["out"].decode()


# ---- subprocess modes ----------------------------------------------------------------------------


def bare_svd(dirs: list[str]) -> None:
    """Time torch.linalg.svd (float32, thin) of every 2-D weight, as stored and in tall orientation."""
    import torch

    from posttrain.analysis.checkpoints import Checkpoint

    rows = []
    for d in dirs:
        ck = Checkpoint(d)
        for name in ck.names():
            if len(ck.shape(name)) != 2:
                continue
            w = ck.get(name).float()
            times = {}
            for orient in ("stored", "tall"):
                if orient == "tall" and w.shape[0] >= w.shape[1]:
                    times["tall"] = times["stored"]
                    continue
                a = w if orient == "stored" else w.mT.contiguous()
                t0 = time.perf_counter()
                U, S, Vh = torch.linalg.svd(a, full_matrices=False)
                times[orient] = time.perf_counter() - t0
                del U, S, Vh, a
            rows.append({"dir": d, "name": name, "shape": list(w.shape), **times})
            del w
    print(json.dumps(rows))


def weightwatcher_analyze(d: str) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import weightwatcher as ww

    t0 = time.perf_counter()
    details = ww.WeightWatcher(model=d).analyze()
    t = time.perf_counter() - t0
    print(json.dumps({"seconds": t, "alpha": {str(r.longname): float(r.alpha) for r in details.itertuples()},
                      "n_layers": len(details)}))


# ---- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "diff_bench")
    ap.add_argument("--layers", type=int, default=QWEN05["layers"], help="decoder layers (24 = the real model)")
    ap.add_argument("--threads", type=int, default=None, help="torch/BLAS threads for every measured run")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (about 1 GB each at full size)")
    ap.add_argument("--reuse", action="store_true", help="reuse checkpoints kept by an earlier --keep run")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-ww", action="store_true")
    ap.add_argument("--_build", nargs=2, dest="build", help=argparse.SUPPRESS)
    ap.add_argument("--_bare-svd", nargs="+", dest="bare_svd", help=argparse.SUPPRESS)
    ap.add_argument("--_ww", dest="ww", help=argparse.SUPPRESS)
    ap.add_argument("--_info", action="store_true", dest="info", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        build(Path(args.build[0]), {**QWEN05, "layers": int(args.build[1])})
        return
    if args.bare_svd:
        return bare_svd(args.bare_svd)
    if args.ww:
        return weightwatcher_analyze(args.ww)
    if args.info:
        import torch

        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}))
        return

    # this process stays small (no torch): every measurement runs in a child of its own
    out = args.out
    ck = out / "checkpoints"
    env = {**os.environ, "POSTTRAIN_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    if args.threads:
        env.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    info = json.loads(run_measured([sys.executable, __file__, "--_info"], env)[2])
    print(f"machine: {os.cpu_count()} CPUs, torch {info['torch']}, {info['threads']} thread(s); "
          f"Qwen2.5-0.5B shapes with {args.layers} layers", flush=True)
    base, ft = ck / "base", ck / "ft"
    if args.reuse and (ft / "model.safetensors.index.json").is_file():
        print(f"reusing {os.path.relpath(ck)}")
    else:
        t, _, _ = run_measured([sys.executable, __file__, "--_build", str(ck), str(args.layers)], env)
        print(f"built checkpoints in {t:.0f}s: {os.path.relpath(ck)}", flush=True)
    result: dict = {"threads": info["threads"], "layers": args.layers, "cpus": os.cpu_count(), "torch": info["torch"]}
    try:
        runs = {}
        for flag in ("--spectral", "--esd"):
            res_dir = out / f"result{flag.replace('--', '_')}"
            shutil.rmtree(res_dir, ignore_errors=True)
            cmd = [sys.executable, "-m", "posttrain.cli", "diff", str(base), str(ft), "--out", str(res_dir), flag]
            wall, rss, _ = run_measured(cmd, env)
            runs[flag] = (wall, rss, res_dir)
            result[f"diff{flag.replace('--', '_')}"] = {"seconds": wall, "peak_rss_mib": rss,
                                                        "command": "posttrain " + " ".join(cmd[3:])}
            print(f"posttrain diff {flag}: {wall:.1f}s wall, peak RSS {rss:.0f} MiB", flush=True)
        wall, rss, res_dir = runs["--spectral"]
        wall_esd = runs["--esd"][0]
        import pandas as pd

        table = pd.read_parquet(res_dir / "tensors.parquet")
        js = json.loads((res_dir / "diff.json").read_text())
        m = js["models"]["ft"]
        print(f"  planted rel. update 0.01 -> measured total {m['rel_update_total']:.4f}; principal_angle_top "
              f"{m['principal_angle_top']:.3f} deg; sv_rel_change_top {m['sv_rel_change_top']:.2e}; "
              f"decompositions {table['svd'].value_counts().to_dict()}", flush=True)
        print(f"  peak RSS target < 1536 MiB: {'met' if rss < 1536 else 'NOT met'} ({rss:.0f} MiB)")

        if not args.skip_baseline:
            _, rss_b, text = run_measured([sys.executable, __file__, "--_bare-svd", str(base), str(ft)], env)
            rows = json.loads(text)
            emb = [r for r in rows if "embed_tokens" in r["name"]]
            rest = [r for r in rows if "embed_tokens" not in r["name"]]
            stored, tall = sum(r["stored"] for r in rows), sum(r["tall"] for r in rows)
            b = {"stored_s": stored, "tall_s": tall, "embedding_s": sum(r["tall"] for r in emb),
                 "non_embedding_stored_s": sum(r["stored"] for r in rest),
                 "non_embedding_tall_s": sum(r["tall"] for r in rest), "n_matrices": len(rows),
                 "peak_rss_mib": rss_b}
            result["bare_svd"] = b
            print(f"bare torch.linalg.svd (float32), {len(rows)} matrices of both checkpoints: as stored "
                  f"{stored:.1f}s, tall orientation {tall:.1f}s (embedding {b['embedding_s']:.1f}s of it); "
                  f"peak RSS {rss_b:.0f} MiB")
            print(f"  diff --spectral / bare SVD: {wall / stored:.2f}x as stored, {wall / tall:.2f}x tall "
                  f"(target <= 1.25x): {'met' if wall <= 1.25 * tall else 'NOT met'} against the stricter (tall)")

            # the same comparison without the embedding, which diff analyses through its Gram matrix: time
            # diff on the embedding alone (Python API, same settings) and subtract it
            code = ("import time,sys; from posttrain.analysis.checkpoints import Checkpoint; "
                    "from posttrain.analysis.scan import DiffOptions, scan; "
                    "b=Checkpoint(sys.argv[1]); f=Checkpoint(sys.argv[2]); "
                    "emb=[n for n in b.names() if 'embed_tokens' in n]; "
                    "names=emb if sys.argv[3]=='emb' else [n for n in b.names() if n not in emb]; "
                    "t=time.perf_counter(); scan(b,{'ft':f},names,DiffOptions(spectral=True)); "
                    "print(time.perf_counter()-t)")
            t_emb = float(run_measured([sys.executable, "-c", code, str(base), str(ft), "emb"], env)[2].strip())
            t_rest = float(run_measured([sys.executable, "-c", code, str(base), str(ft), "rest"], env)[2].strip())
            result["diff_spectral"]["embedding_s"] = t_emb
            result["diff_spectral"]["non_embedding_compute_s"] = t_rest
            ne = wall - t_emb
            nt, ns = b["non_embedding_tall_s"], b["non_embedding_stored_s"]
            print(f"  without the embedding: diff {ne:.1f}s (CLI total minus the embedding: process start, tables "
                  f"and plots included) vs bare SVD {nt:.1f}s tall ({ne / nt:.2f}x) / {ns:.1f}s as stored "
                  f"({ne / ns:.2f}x)")
            print(f"  compute only (Python API scan, same settings): non-embedding tensors {t_rest:.1f}s "
                  f"({t_rest / nt:.2f}x tall SVD), embedding {t_emb:.1f}s vs its SVD {b['embedding_s']:.1f}s", flush=True)

        if args.skip_ww:
            print("WeightWatcher comparison skipped (--skip-ww)")
        else:
            import importlib.util

            if importlib.util.find_spec("weightwatcher") is None:
                print("WeightWatcher is not installed (pip install weightwatcher): comparison skipped")
            else:
                ww = {}
                for tag, d in (("base", base), ("ft", ft)):
                    w_wall, w_rss, text = run_measured([sys.executable, __file__, "--_ww", str(d)], env)
                    ww[tag] = {**json.loads(text), "wall_s": w_wall, "peak_rss_mib": w_rss}
                total = ww["base"]["wall_s"] + ww["ft"]["wall_s"]
                diffs = []
                for tag in ("base", "ft"):
                    ours = dict(zip(table["name"], table[f"alpha_{tag}"]))
                    for lname, a in ww[tag]["alpha"].items():
                        o = ours.get(lname + ".weight")
                        if o is not None and math.isfinite(o) and a > 0:
                            diffs.append(abs(o - a))
                agree = sum(d < 1e-3 for d in diffs)
                result["weightwatcher"] = {"base": {k: v for k, v in ww["base"].items() if k != "alpha"},
                                           "ft": {k: v for k, v in ww["ft"].items() if k != "alpha"},
                                           "total_wall_s": total, "alpha_compared": len(diffs),
                                           "alpha_within_1e-3": agree,
                                           "alpha_max_abs_diff": max(diffs) if diffs else None}
                print(f"WeightWatcher analyze() (defaults, it skips the embedding): base {ww['base']['wall_s']:.1f}s "
                      f"({ww['base']['n_layers']} layers, peak RSS {ww['base']['peak_rss_mib']:.0f} MiB), ft "
                      f"{ww['ft']['wall_s']:.1f}s: {total:.1f}s for both checkpoints")
                print(f"  vs diff --esd (same metrics: singular values, alpha, stable rank; embedding included) "
                      f"{wall_esd:.1f}s: {total / wall_esd:.2f}x faster; vs the full diff --spectral {wall:.1f}s: "
                      f"{total / wall:.2f}x")
                print(f"  alpha agreement: {agree}/{len(diffs)} layers within 1e-3, max |diff| "
                      f"{max(diffs) if diffs else float('nan'):.2e}")
        (out / "diff_bench.json").write_text(json.dumps(result, indent=2))
        print(f"wrote {os.path.relpath(out / 'diff_bench.json')}")
    finally:
        if not args.keep:
            shutil.rmtree(ck, ignore_errors=True)


if __name__ == "__main__":
    main()
