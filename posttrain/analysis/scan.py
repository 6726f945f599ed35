"""The streaming pass behind `posttrain diff`: every tensor of a base against N fine-tuned models.

Tensor by tensor (outer loop) and model by model (inner loop), so each base tensor is read and,
with `spectral`, decomposed once however many models are compared. Element-wise statistics stream
over blocks of rows, so a tensor is never resident more than `chunk_elems` elements at a time
across all checkpoints; only the SVD of a 2-D weight needs the whole weight pair (and for very tall
matrices, embeddings and LM heads, not even that: their n x n Gram matrices accumulate block by
block instead). Peak memory is therefore a small multiple of the largest decomposed matrix, never
the model.

Element-wise statistics per tensor and model (dW = W_t - W_b, float64 accumulation):
  ||W_b||_F, ||dW||_F, rel_update = ||dW||_F / ||W_b||_F,
  changed_frac   = #{|dW_ij| > tol} / numel       (update sparsity at a tolerance),
  unchanged_frac = #{W_t,ij == W_b,ij} / numel    (bit-for-bit unchanged; +0 and -0 count as equal),
and per pair of models (a, b): <dW_a, dW_b> and ||dW_a - dW_b||_F^2 (for cosines and distances).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain.analysis import spectral as sp
from posttrain.analysis.checkpoints import Checkpoint, classify
from posttrain.analysis.factors import gram, gram_factors, gram_values, singular_values, svd_factors, tall
from posttrain.analysis.diagnostics import matrix_columns, matrix_diagnostics
from posttrain.analysis.tensor_metrics import MatrixPair, from_gram, from_svd
from posttrain.errors import UserError

NAN = float("nan")
DEFAULT_TOP_FRAC = 0.05


class DiffOptions(BaseModel):
    """Knobs of a diff. See `posttrain.analysis.diff.diff` for the user-facing description."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    spectral: bool = False
    esd: bool = False  # singular values only: spectrum changes and ESD summaries (implied by spectral)
    rank: int | None = Field(None, ge=1)  # top-k = rank; truncated SVD for large matrices (svd="auto")
    top_frac: float | None = Field(None, gt=0, le=1)  # top-k = ceil(top_frac * min(m, n)); truncated SVD for large matrices
    svd: Literal["auto", "full", "randomized"] = "auto"  # full: LAPACK SVD wherever it fits, never truncated
    svd_dtype: Literal["auto", "float32", "float64"] = "auto"  # auto: float64 up to 2^18 entries, else float32
    bins: int = Field(20, ge=1)  # spectrum ranges of the principal-angle curves
    tol: float = Field(1e-5, ge=0)  # |dW_ij| above this counts as changed
    device: str = "cpu"
    min_eval: float = 1e-5  # ESD eigenvalues at or below are dropped (WeightWatcher's default)
    gram_min_numel: int = 2**24  # matrices at least this big and this elongated always use the Gram path
    gram_min_aspect: float = 4.0  # (an in-memory SVD of them would take several times their size)
    fast_gram_aspect: float = 2.0  # float32-mode matrices this elongated use it too (svd="auto"): faster
    chunk_elems: int = Field(2**24, ge=1)  # elements per streamed block, summed over all checkpoints
    randomized_min_dim: int = 256  # truncated SVD only pays off from about this size
    null_seed: int = 0  # seeds the norm-matched random updates of `tensor_metrics.random_update_null`
    null_models: list[str] | None = None  # the models that get that null (None: all)

    @model_validator(mode="after")
    def _one_k(self) -> "DiffOptions":
        if self.rank is not None and self.top_frac is not None:
            raise ValueError("give either rank or top_frac, not both")
        return self

    @classmethod
    def parse(cls, **kw) -> "DiffOptions":
        """Validated options; a bad value is a one-line `UserError` naming the option."""
        try:
            return cls(**kw)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(map(str, first["loc"])) or "options"
            raise UserError(f"diff: {loc}: {first['msg'].removeprefix('Value error, ')}") from None

    def k_for(self, r: int) -> int:
        if self.rank is not None:
            return max(1, min(self.rank, r))
        return sp.top_k(r, self.top_frac if self.top_frac is not None else DEFAULT_TOP_FRAC)

    def truncate(self, r: int) -> int | None:
        """The rank of a truncated SVD for a matrix with min dimension r, or None for a full SVD."""
        if self.svd == "full":
            return None
        k = self.k_for(r)
        if self.svd == "randomized":
            return k if k < r else None
        asked = self.rank is not None or self.top_frac is not None
        return k if asked and r >= self.randomized_min_dim and 4 * k <= r else None

    def dtype_for(self, numel: int) -> torch.dtype:
        if self.svd_dtype == "float64" or (self.svd_dtype == "auto" and numel <= 2**18):
            return torch.float64
        return torch.float32


@dataclass
class ScanResult:
    rows: dict[str, list[dict]] = field(default_factory=dict)  # model -> per-tensor rows
    pair_rows: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    curves: list[dict] = field(default_factory=list)  # model, name, side, bin, x, angle (degrees)
    spectra: list[dict] = field(default_factory=list)  # model, name, sv_base, sv_ft (float lists)


_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def scan(base: Checkpoint, models: dict[str, Checkpoint], names: list[str], opts: DiffOptions,
         pairs: list[tuple[str, str]] = (), progress: Callable[[int], None] | None = None) -> ScanResult:
    """Stream every tensor in `names` once; returns per-tensor rows for each model and each pair."""
    dev = torch.device(opts.device)
    res = ScanResult({m: [] for m in models}, {p: [] for p in pairs})
    for name in names:
        _scan_tensor(base, models, name, opts, list(pairs), dev, res)
        if progress:
            progress(len(models))
    return res


def _scan_tensor(base, models, name, opts, pairs, dev, res) -> None:
    info = classify(name)
    shape = base.shape(name)
    numel = math.prod(shape)
    dtypes = {base.dtype(name), *(ck.dtype(name) for ck in models.values())}
    floating = all(d in _FLOAT_DTYPES for d in dtypes)
    matrix = len(shape) == 2 and min(shape) >= 2
    spectral = (opts.spectral or opts.esd) and matrix and floating
    use_gram = spectral and _use_gram(shape, numel, opts)
    # stream along the long side so Gram blocks are rows of the tall orientation
    dim = 1 if use_gram and shape[0] < shape[1] else 0
    length = shape[dim] if shape else 1
    per_slice = max(1, numel // max(length, 1))  # elements per streamed row (or column)
    nck = len(models) + 1
    step = max(1, opts.chunk_elems // (nck * per_slice))
    whole = step >= length  # the whole tensor fits in one block: keep it for the SVD
    exact = bool(dtypes & {"F32", "F64"}) or not floating  # float32 data needs float64 differences
    edt = torch.float64 if exact else torch.float32

    b_sq = 0.0
    d_sq = dict.fromkeys(models, 0.0)
    changed = dict.fromkeys(models, 0)
    unchanged = dict.fromkeys(models, 0)
    dots = dict.fromkeys(pairs, 0.0)
    dist = dict.fromkeys(pairs, 0.0)
    G: dict = {}
    kept: dict[str, torch.Tensor] = {}
    for start in range(0, length, step):
        stop = min(length, start + step)
        raw_b = _read(base, name, shape, start, stop, dim)
        wb = _as2d(raw_b.to(dev, edt), dim)
        b_sq += _sumsq(wb)
        if use_gram:
            # G_bb and G_bd = W_b^T dW (which the left singular subspaces and C = U_b^T dW V_b are read
            # from) in float64. G_dd = dW^T dW only yields the singular values of dW and enters G_tt
            # scaled by ||dW||^2 / ||W_b||^2, so for 16-bit weights float32 blocks summed in float64
            # are as accurate as the data, at twice the speed.
            xb = (wb.mT if dim == 1 else wb).double()
            G["bb"] = G.get("bb", 0) + gram(xb)
        deltas = {}
        for m, ck in models.items():
            raw_t = _read(ck, name, shape, start, stop, dim)
            wt = raw_t.to(dev, edt).reshape(wb.shape)
            d = wt - wb
            d_sq[m] += _sumsq(d)
            unchanged[m] += d.numel() - int(torch.count_nonzero(d))
            changed[m] += int(torch.count_nonzero(d.abs() > opts.tol))
            deltas[m] = d
            if use_gram:
                xd = d.mT if dim == 1 else d
                G[("bd", m)] = G.get(("bd", m), 0) + xb.mT @ xd.double()
                G[("dd", m)] = G.get(("dd", m), 0) + gram(xd.to(edt)).double()
            if whole and spectral:
                kept[m] = wt
            del raw_t, wt
        for a, b in pairs:
            dots[(a, b)] += float(torch.vdot(deltas[a].flatten(), deltas[b].flatten()).double())
            dist[(a, b)] += _sumsq(deltas[b] - deltas[a])
        if whole and spectral:
            kept[""] = wb
        del deltas, raw_b

    b_finite = math.isfinite(b_sq)
    columns = matrix_columns()
    rows = {}
    for m in models:
        finite = b_finite and math.isfinite(d_sq[m])
        rows[m] = {
            "name": name, "layer": info.layer, "module": info.module, "shape": "x".join(map(str, shape)),
            "numel": numel, "ndim": len(shape), "dtype": models[m].dtype(name),
            "base_norm": math.sqrt(b_sq) if finite else NAN, "delta_norm": math.sqrt(d_sq[m]) if finite else NAN,
            "rel_update": math.sqrt(d_sq[m] / b_sq) if finite and b_sq > 0 else NAN, "finite": finite,
            "changed_frac": changed[m] / numel if finite and numel else NAN,
            "unchanged_frac": unchanged[m] / numel if finite and numel else NAN,
            "svd": "", **dict.fromkeys(columns, NAN),
        }
    for a, b in pairs:
        ok = rows[a]["finite"] and rows[b]["finite"]
        res.pair_rows[(a, b)].append({
            "name": name, "layer": info.layer, "module": info.module, "numel": numel,
            "dot": dots[(a, b)] if ok else NAN, "sq_a": d_sq[a] if ok else NAN, "sq_b": d_sq[b] if ok else NAN,
            "dist_sq": dist[(a, b)] if ok else NAN, "base_sq": b_sq if ok else NAN,
        })
    if spectral and b_finite:
        todo = [m for m in models if rows[m]["finite"]]
        ctx = _PairContext(opts, shape, rows, d_sq, b_sq, name)
        if use_gram:
            out = _spectral_gram(G, todo, ctx)
        else:
            out = _spectral_svd(base, models, name, todo, kept, dev, edt, ctx)
        for m, (curve, sv_base, sv_ft) in out.items():
            res.curves.extend({"model": m, "name": name, "layer": info.layer, "module": info.module, **c} for c in curve)
            res.spectra.append({"model": m, "name": name, "layer": info.layer, "module": info.module,
                                "sv_base": sv_base, "sv_ft": sv_ft})
    for m in models:
        res.rows[m].append(rows[m])


def _use_gram(shape: tuple[int, ...], numel: int, opts: DiffOptions) -> bool:
    """Gram path (factors.gram_factors) rather than an SVD of the matrix?

    Always for huge elongated matrices (embeddings, LM heads), which never need to be in memory then.
    With svd="auto" also for every elongated matrix that would be decomposed in float32: in float64
    the Gram route gives singular values to relative accuracy eps64 * kappa^2 (better than a float32
    SVD's eps32 * kappa for condition numbers kappa below ~1e8) and, from m x n with m >= 2n, costs
    about 25% less than the two float32 SVDs plus the products the metrics need.
    """
    aspect = max(shape) / min(shape)
    if numel >= opts.gram_min_numel and aspect >= opts.gram_min_aspect:
        return True
    return (opts.spectral and opts.svd == "auto" and opts.truncate(min(shape)) is None
            and opts.dtype_for(numel) == torch.float32 and aspect >= opts.fast_gram_aspect)


def _as2d(x: torch.Tensor, dim: int) -> torch.Tensor:
    """A block as a matrix whose rows are the streamed slices (1-D tensors: one row)."""
    if x.dim() <= 1:
        return x.reshape(1, -1)
    return x if dim == 1 else x.reshape(x.shape[0], -1)


def _read(ck: Checkpoint, name: str, shape: tuple, start: int, stop: int, dim: int) -> torch.Tensor:
    if not shape:
        return ck.get(name).reshape(1)
    if start == 0 and stop == shape[dim]:
        return ck.get(name)
    return ck.get_block(name, start, stop, dim)


def _sumsq(x: torch.Tensor) -> float:
    """sum of squares with float64 accumulation; row norms first keep float32 data accurate to ~1e-7."""
    if x.dtype == torch.float64 or x.dim() < 2:
        return float(x.double().pow(2).sum())
    return float(torch.linalg.vector_norm(x, dim=-1).double().pow(2).sum())


@dataclass
class _PairContext:
    """What every model's per-matrix pass of one tensor shares (the base's ESD fit among others)."""

    opts: DiffOptions
    shape: tuple[int, ...]
    rows: dict[str, dict]
    d_sq: dict[str, float]
    b_sq: float
    name: str = ""
    base_cache: dict = field(default_factory=dict)

    def fill(self, m: str, fb, ft, ps, method: str) -> tuple[list[dict], list[float], list[float]]:
        """Run the table's per-matrix diagnostics on one model's pair; returns (curve, sv_base, sv_ft)."""
        opts = self.opts
        pair = MatrixPair(fb, ft, opts.k_for(min(self.shape)), bins=opts.bins, delta_sq=self.d_sq[m], base_sq=self.b_sq,
                          transposed=self.shape[0] < self.shape[1], ps=ps, base_cache=self.base_cache,
                          min_eval=opts.min_eval, name=self.name,
                          null_seed=opts.null_seed if opts.null_models is None or m in opts.null_models else None)
        row = self.rows[m]
        row["k"] = pair.k if ps is not None else max(1, min(opts.k_for(min(self.shape)), fb.S.numel()))
        for d in matrix_diagnostics(vectors=ps is not None):
            row.update(d.compute(pair))
        row["svd"] = method
        return pair.curve, fb.S.double().cpu().tolist(), ft.S.double().cpu().tolist()


def _spectral_svd(base, models, name, todo, kept, dev, edt, ctx: _PairContext) -> dict:
    opts, shape = ctx.opts, ctx.shape
    dt = opts.dtype_for(math.prod(shape))
    wb_e = kept.get("")
    wb_e = (wb_e if wb_e is not None else base.get(name)).to(dev, edt)
    wb = wb_e.to(dt)
    tb, _ = tall(wb)
    r = tb.shape[-1]
    trunc = opts.truncate(r) if opts.spectral else None
    fb = svd_factors(tb, trunc) if opts.spectral else singular_values(tb)
    out = {}
    for m in todo:
        wt_e = kept.get(m)
        wt_e = (wt_e if wt_e is not None else models[m].get(name)).to(dev, edt).reshape(wb_e.shape)
        tt, _ = tall(wt_e.to(dt))
        if opts.spectral:
            ft = svd_factors(tt, trunc)
            dW, _ = tall((wt_e - wb_e).to(dt))  # differenced before rounding to the SVD's dtype
            out[m] = ctx.fill(m, fb, ft, from_svd(dW, fb, ft), "randomized" if trunc else "full")
        else:
            ft = singular_values(tt)
            out[m] = ctx.fill(m, fb, ft, None, "values")
        del wt_e, tt, ft
    return out


def _spectral_gram(G, todo, ctx: _PairContext) -> dict:
    opts = ctx.opts
    fb = gram_factors(G["bb"]) if opts.spectral else gram_values(G["bb"])
    out = {}
    for m in todo:
        Gtt = G["bb"] + G[("bd", m)] + G[("bd", m)].mT + G[("dd", m)]
        if opts.spectral:
            ft = gram_factors(Gtt)
            out[m] = ctx.fill(m, fb, ft, from_gram(G["bb"], G[("bd", m)], G[("dd", m)], fb, ft), "gram")
        else:
            out[m] = ctx.fill(m, fb, gram_values(Gtt), None, "gram-values")
    return out
