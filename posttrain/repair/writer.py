"""Write a repaired checkpoint: streamed tensor by tensor, sharded like the target, atomic, recorded.

The output directory is a complete Hugging Face checkpoint:

- the safetensors files have the target's file names, tensor names, dtypes and shapes (so the
  target's ``model.safetensors.index.json`` is copied verbatim and stays correct) and the target
  shards' ``__metadata__``;
- config, tokenizer and generation files are copied from the (first) target: every top-level file
  except weights in any format, index files, hidden files and our own ``repair.json`` / ``eval.json``;
- ``repair.json`` records the method, its normalised parameters, the inputs (paths and
  fingerprints), the resolved layer selection and which tensors were changed.

Tensors are read, repaired and written one at a time (one base tensor plus one per target in
memory), and the directory appears atomically via `posttrain.io.atomic_dir`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from posttrain.analysis.checkpoints import Checkpoint, check_compatible, check_finite, classify
from posttrain.errors import UserError
from posttrain.io import atomic_dir, atomic_write_json, versions
from posttrain.progress import progress_bar
from posttrain.repair.base import ModelInfo, Repair, TensorInfo
from posttrain.repair.safetensors_stream import DTYPES, StreamWriter

REPAIR_VERSION = 1  # bump when a repair's output for the same params changes, to invalidate caches
RECORD = "repair.json"
INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz", ".npy")
_NOT_COPIED = {RECORD, "eval.json"}


def _config(path: Path) -> dict | None:
    f = path / "config.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{f}: not valid JSON") from None


def open_inputs(base_dir: str | Path, target_dirs: Sequence[str | Path]) -> tuple[Checkpoint, list[Checkpoint]]:
    """Open base and targets and check they share one architecture; `UserError` naming any mismatch."""
    if not target_dirs:
        raise UserError("a repair needs at least one target checkpoint")
    for t in map(Path, target_dirs):
        if not t.exists():
            raise UserError(f"checkpoint not found: {t}")
        if not (t / "config.json").is_file():
            raise UserError(f"target {t}: not a Hugging Face checkpoint directory (no config.json); "
                            "its config and tokenizer are copied to the output")
    base = Checkpoint(base_dir)
    targets = [Checkpoint(t) for t in target_dirs]
    base_cfg = _config(base.path) if base.path.is_dir() else None
    for t in targets:
        check_compatible(base, t)
        t_cfg = _config(t.path)
        if base_cfg and t_cfg and base_cfg.get("model_type") != t_cfg.get("model_type"):
            raise UserError(f"architecture mismatch: {base.path} is {base_cfg.get('model_type')!r} "
                            f"but {t.path} is {t_cfg.get('model_type')!r}")
    for name in targets[0].names():
        if targets[0].dtype(name) not in DTYPES:
            raise UserError(f"{targets[0].path}: tensor {name} has unsupported dtype {targets[0].dtype(name)}")
    return base, targets


def model_info(target: Checkpoint) -> ModelInfo:
    tensors = {}
    for name in target.names():
        info = classify(name)
        tensors[name] = TensorInfo(name, target.shape(name), target.dtype(name), info.layer, info.module)
    layers = [t.layer for t in tensors.values() if t.layer is not None]
    return ModelInfo(tensors, max(layers) + 1 if layers else 0)


def fingerprint(path: str | Path) -> str:
    """Cheap identity of a checkpoint's weights: names, sizes and modification times of its weight files.

    A retrained or replaced checkpoint gets new mtimes, so a cached repair of the old one is not
    reused; moving a run directory (which keeps mtimes) keeps the cache valid.
    """
    p = Path(path)
    files = [p] if p.is_file() else sorted([*p.glob("*.safetensors"), *p.glob(INDEX), *p.glob("*.bin")])
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def record_key(repair: Repair, base_dir: str | Path, target_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """What makes two repair outputs the same: method, parameters and input fingerprints."""
    return {
        "repair_version": REPAIR_VERSION,
        "method": repair.name,
        "params": repair.params,
        "inputs": {"base": fingerprint(base_dir), "targets": [fingerprint(t) for t in target_dirs]},
    }


def read_record(out_dir: str | Path) -> dict | None:
    f = Path(out_dir) / RECORD
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_cached(out_dir: str | Path, key: dict[str, Any]) -> bool:
    """True when `out_dir` holds a complete repair output made with exactly this key."""
    rec = read_record(out_dir)
    if rec is None or {k: rec.get(k) for k in key} != json.loads(json.dumps(key)):
        return False
    try:
        return all((Path(out_dir) / f).is_file() for f in rec["files"])
    except (KeyError, TypeError):
        return False


def _check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    out_r = out.resolve()
    for p in inputs:
        p_r = p.resolve()
        if out_r == p_r or out_r in p_r.parents or p_r in out_r.parents:
            raise UserError(f"--out {out} overlaps the input {p}; write the repair somewhere else")
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} exists; pass --overwrite to replace it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / RECORD).is_file()):
            raise UserError(f"{out} exists and is not a repair output (no {RECORD}); refusing to replace it")


def _copy_aux(src: Path, dst: Path) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if (not f.is_file() or f.name.startswith(".") or f.name in _NOT_COPIED or f.name.endswith(".index.json")
                or f.name.endswith(_WEIGHT_SUFFIXES)):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


def _out_name(fname: str) -> str:
    """The output file of an input weight file: safetensors names are kept, pickle shards renamed
    (pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors)."""
    if fname.endswith(".safetensors"):
        return fname
    return fname.rsplit(".", 1)[0].replace("pytorch_model", "model", 1) + ".safetensors"


def _params(repair: Repair) -> str:
    return ", ".join(f"{k}={v}" for k, v in repair.own_params().items()) or "these parameters"


def _finite_input(repair: Repair, name: str, tensors: list[tuple[str, Checkpoint, torch.Tensor]]) -> None:
    for which, ck, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{repair.name}: {name} has non-finite values in the {which} ({ck.path}); "
                            "refusing to repair it (nothing written)")


def write_repair(repair: Repair, base_dir: str | Path, target_dirs: Sequence[str | Path], out_dir: str | Path,
                 overwrite: bool = False, device: str = "cpu", show_progress: bool = True) -> dict[str, Any]:
    """Apply `repair` to base/targets and write the checkpoint to `out_dir`; returns the repair.json record."""
    t0 = time.time()
    out = Path(out_dir)
    target_dirs = [Path(t) for t in target_dirs]
    repair.check_targets(len(target_dirs))
    _check_out(out, [Path(base_dir), *target_dirs], overwrite)
    base, targets = open_inputs(base_dir, target_dirs)
    info = model_info(targets[0])
    touched = set(repair.plan(info))
    dev = torch.device(device)
    shards = targets[0].shards()
    key = record_key(repair, base_dir, target_dirs)
    with atomic_dir(out) as tmp:
        aux = _copy_aux(targets[0].path, tmp)
        with progress_bar(len(info.tensors), f"repair {repair.name}", enabled=show_progress) as advance:
            src = targets[0]
            for fname, names in shards.items():
                specs = [(n, src.dtype(n), tuple(src.shape(n))) for n in names]
                writer = StreamWriter(tmp / _out_name(fname), specs, src.metadata(fname) or {"format": "pt"})
                try:
                    for name in writer.order:
                        if name in touched:
                            b, ts = base.get(name), [t.get(name) for t in targets]
                            _finite_input(repair, name, [("base", base, b), *(("target", c, t) for c, t in zip(targets, ts))])
                            tensor = repair.apply(name, b.to(dev), [t.to(dev) for t in ts])
                            del b, ts
                            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                                raise UserError(f"{repair.name}: the output tensor {name} would hold non-finite values "
                                                f"(NaN or inf) with {_params(repair)}; nothing written")
                        else:
                            tensor = src.get(name)
                            check_finite(name, tensor, src.path)
                        writer.write(name, tensor)
                        del tensor
                        advance(1)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
        if (src.path / INDEX).is_file():
            shutil.copy2(src.path / INDEX, tmp / INDEX)
        elif len(shards) > 1:  # sharded pickles: the renamed shards get a safetensors index
            atomic_write_json(tmp / INDEX, {"metadata": {}, "weight_map": {
                n: _out_name(f) for f, names in shards.items() for n in names}})
        record = {
            **key,
            "base": str(Path(base_dir).resolve()),
            "targets": [str(t.resolve()) for t in target_dirs],
            "selection": {"layers": repair.resolved_layers, "description": repair.describe_selection()},
            "tensors_repaired": sorted(touched),
            "n_tensors": {"repaired": len(touched), "copied": len(info.tensors) - len(touched)},
            "files": sorted([*map(_out_name, shards), *aux, *([INDEX] if (tmp / INDEX).is_file() else [])]),
            "wall_seconds": round(time.time() - t0, 3),
            "versions": versions(),
        }
        atomic_write_json(tmp / RECORD, record)
    return record
