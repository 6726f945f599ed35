"""Weight drift during someone else's training loop: a `transformers.TrainerCallback`.

`DriftCallback` measures, every `every` optimizer steps, how far the weights have moved from where
training started, with the numbers `posttrain diff` reports (it runs the same scan and aggregation,
`posttrain.analysis.scan.scan` + `updates.summarise`):

  relative update      sqrt(sum ||W - W0||_F^2) / sqrt(sum ||W0||_F^2) over the tensors of a bucket
                       (all, a module type, a layer, a layer x module cell)
  update sparsity      share of entries with |W - W0| > tol (`changed_frac`)
  principal angles     mean angle between the top-k left (right) singular subspaces of W0 and W for
                       chosen matrices, in degrees (`spectral.principal_angles`, k = 5% of min(m, n)
                       unless `rank` / `top_frac` say otherwise)

The starting weights are written once, at train begin, as an HF checkpoint `<out_dir>/start/`
(safetensors), and read back tensor by tensor for each measurement: no second model is held on the
device. The metrics go through the trainer's own `log` (so to `state.log_history`, TensorBoard,
W&B and every other reporting callback) under `drift/...`, and to `<out_dir>/drift.jsonl`. With
`save_every`, complete checkpoints go to `<out_dir>/checkpoints/step-<N>/`, the layout
`posttrain diff <out_dir>/start <out_dir> --trajectory` reads.

    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.add_callback(DriftCallback(trainer, every=50, save_every=500))
    trainer.train()

Measurements run on the main process only; every process holds the same weights under DDP.
Sharded parameters (FSDP, FSDP2 DTensors, DeepSpeed ZeRO-3) and PEFT adapters are not supported: the
callback refuses them at train begin with a one-line `UserError`, before writing anything.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import Trainer, TrainerCallback

from posttrain.analysis.checkpoints import Checkpoint, check_compatible, classify
from posttrain.analysis.live import LiveWeights
from posttrain.analysis.scan import DiffOptions, scan
from posttrain.analysis.diagnostics import default_spectra_names
from posttrain.analysis.updates import summarise
from posttrain.errors import UserError
from posttrain.io import atomic_dir


class DriftCallback(TrainerCallback):
    """Log weight drift from the starting weights every `every` steps; see the module docstring.

    trainer: the trainer whose loggers receive the metrics (None: call `attach(trainer)` later).
    out_dir: where `start/`, `checkpoints/` and `drift.jsonl` go (default `<output_dir>/drift`).
    save_every: keep a full checkpoint every this many steps (0: none); the last step is always kept.
    angles_for: parameter-name globs of the matrices whose principal angles are logged; None: q_proj
        and down_proj of the first, middle and last layer; []: no angles.
    rank, top_frac: the top-k of the angles (as `posttrain diff --rank / --top-frac`).
    tol: an entry counts as changed when |W - W0| > tol.
    device: where the differences are computed (default: the device of the model's parameters).
    """

    def __init__(self, trainer: Trainer | None = None, *, every: int = 50, out_dir: str | Path | None = None,
                 save_every: int = 0, angles_for: list[str] | None = None, rank: int | None = None,
                 top_frac: float | None = None, tol: float = 1e-5, device: str | None = None,
                 prefix: str = "drift/") -> None:
        if not isinstance(every, int) or every < 1:
            raise UserError(f"DriftCallback: every must be a positive number of steps, not {every!r}")
        if not isinstance(save_every, int) or save_every < 0:
            raise UserError(f"DriftCallback: save_every must be >= 0 steps, not {save_every!r}")
        DiffOptions.parse(spectral=True, rank=rank, top_frac=top_frac, tol=tol)
        self.trainer = trainer
        self.every, self.save_every = every, save_every
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.angles_for = angles_for
        self.rank, self.top_frac, self.tol, self.device, self.prefix = rank, top_frac, tol, device, prefix
        self.history: list[dict[str, Any]] = []
        self._base: Checkpoint | None = None
        self._names: list[str] = []
        self._angle_names: list[str] = []

    def attach(self, trainer: Trainer) -> "DriftCallback":
        """Bind to `trainer` (whose loggers receive the metrics) and register with it if needed."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # ---- paths --------------------------------------------------------------------------------
    @property
    def start_dir(self) -> Path:
        return self.out_dir / "start"

    def checkpoint_dir(self, step: int) -> Path:
        return self.out_dir / "checkpoints" / f"step-{step}"

    # ---- trainer events -----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.trainer is None:
            raise UserError("DriftCallback needs its trainer to log through the trainer's loggers: "
                            "trainer.add_callback(DriftCallback(trainer, ...)) or DriftCallback(...).attach(trainer)")
        _check_full_weights(model)
        if self.out_dir is None:
            self.out_dir = Path(args.output_dir) / "drift"
        # angle matrices are resolved before anything is written, so a bad pattern leaves no trace
        live = LiveWeights(model.state_dict(), "the trained model")
        angle_names = self._resolve_angles(live)
        if state.global_step == 0:
            if self.out_dir.exists() and any(self.out_dir.iterdir()):
                raise UserError(f"DriftCallback: {self.out_dir} exists and is not empty (another run's drift?); "
                                "remove it or pass another out_dir")
            _save(model, processing_class, self.start_dir)
        elif not self.start_dir.is_dir():
            raise UserError(f"DriftCallback: resuming at step {state.global_step} but the starting weights "
                            f"{self.start_dir} are missing; drift cannot be measured from the start")
        self._base = Checkpoint(self.start_dir)
        self._names = check_compatible(self._base, LiveWeights.of(model, self._base.names(), "the trained model"))
        self._angle_names = [n for n in angle_names if n in self._base]

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero or self._base is None:
            return
        step, last = state.global_step, state.global_step == state.max_steps
        if self.save_every and (step % self.save_every == 0 or last):
            _save(model, processing_class, self.checkpoint_dir(step))
        if step % self.every == 0 or last:
            metrics = self.measure(model)
            self.history.append({"step": step, **metrics})
            with open(self.out_dir / "drift.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            # Trainer.log, not the trainer's own override: TRL's trainers flush their per-step metric
            # buffers in theirs, which a mid-interval call would split. Its on_log event clears
            # control.should_log, which would drop the trainer's own loss log of this step: restore it.
            should_log = control.should_log
            Trainer.log(self.trainer, dict(metrics))
            control.should_log = should_log
        return control

    # ---- measurement --------------------------------------------------------------------------
    def _options(self, spectral: bool, model: torch.nn.Module) -> DiffOptions:
        device = self.device or str(next(model.parameters()).device)
        return DiffOptions(spectral=spectral, rank=self.rank, top_frac=self.top_frac, tol=self.tol, device=device)

    @torch.no_grad()
    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """The drift metrics of `model` now against the starting weights (flat, finite floats)."""
        live = LiveWeights.of(model, self._names, "the trained model")
        rows = pd.DataFrame(scan(self._base, {"m": live}, self._names, self._options(False, model)).rows["m"])
        s = summarise(rows)
        p = self.prefix
        out: dict[str, float] = {f"{p}rel_update": s.rel_update_total, f"{p}changed_frac": s.changed_frac}
        out.update({f"{p}rel_update/{m}": v for m, v in s.rel_update_by_module.items()})
        width = max(2, len(str(len(s.rel_update_by_layer) - 1)))
        out.update({f"{p}rel_update/layer{i:0{width}d}": v for i, v in enumerate(s.rel_update_by_layer)})
        for m, per_layer in s.rel_update_by_layer_module.items():
            out.update({f"{p}rel_update/layer{i:0{width}d}/{m}": v for i, v in enumerate(per_layer)})
        out.update({f"{p}changed_frac/{m}": v for m, v in s.changed_frac_by_module.items()})
        if s.nonfinite:
            out[f"{p}nonfinite_tensors"] = float(len(s.nonfinite))
        if self._angle_names:
            srows = scan(self._base, {"m": live}, self._angle_names, self._options(True, model)).rows["m"]
            tops = []
            for r in srows:
                out[f"{p}angle_top_left/{r['name']}"] = r["angle_top_left"]
                out[f"{p}angle_top_right/{r['name']}"] = r["angle_top_right"]
                tops.append((r["angle_top_left"] + r["angle_top_right"]) / 2)
            out[f"{p}principal_angle_top"] = sum(tops) / len(tops)
        # a bucket without tensors, or a non-finite tensor, has no value: leave it out, never log NaN
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}

    def _resolve_angles(self, weights: LiveWeights) -> list[str]:
        matrices = [n for n in weights.names() if len(weights.shape(n)) == 2 and min(weights.shape(n)) >= 2
                    and weights.dtype(n) in ("F64", "F32", "F16", "BF16")]
        if self.angles_for is None:
            info = pd.DataFrame([{"name": n, "layer": classify(n).layer, "module": classify(n).module}
                                 for n in matrices])
            return default_spectra_names(info) if not info.empty else []
        out = []
        for pattern in self.angles_for:
            hits = [n for n in matrices if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise UserError(f"DriftCallback: angles_for pattern {pattern!r} matches no weight matrix")
            out += [n for n in hits if n not in out]
        return out


def _check_full_weights(model: torch.nn.Module) -> None:
    """The drift is measured on the full weight matrices the main process holds: refuse, in one
    line, the setups where it holds a shard or only adapters."""
    if type(model).__name__ == "FullyShardedDataParallel":
        raise UserError("DriftCallback: the model is sharded by FSDP; sharded parameters are not supported "
                        "(measure a DDP run, or `posttrain diff` the saved checkpoints)")
    for name, p in model.named_parameters():
        if type(p).__name__ == "DTensor":
            raise UserError(f"DriftCallback: {name} is a sharded DTensor (FSDP2 or tensor parallel); sharded "
                            "parameters are not supported (measure a DDP run, or `posttrain diff` the saved checkpoints)")
        if hasattr(p, "ds_numel"):
            raise UserError(f"DriftCallback: {name} is partitioned by DeepSpeed ZeRO-3; sharded parameters are not "
                            "supported (use ZeRO-1/2, or `posttrain diff` the saved checkpoints)")
    if hasattr(model, "peft_config"):
        raise UserError("DriftCallback: the model is a PEFT model (adapters); merge the adapters and "
                        "`posttrain diff` the merged checkpoints instead")


def _save(model: torch.nn.Module, tok, path: Path) -> None:
    """A complete HF checkpoint (safetensors weights, config, tokenizer), written atomically."""
    with atomic_dir(path) as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, safe_serialization=True)
        else:  # a plain nn.Module in a Trainer: its weights alone (shared tensors stored once)
            from safetensors.torch import save_model

            save_model(model, str(tmp / "model.safetensors"))
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(tmp)
