"""Where in the weights each method changed the model (Scalpel vs Hammer, arXiv 2507.10616)."""

from __future__ import annotations

from posttrain.findings import Context, Measured, finding

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def mid_layers(n: int) -> range:
    """The middle third of n layers (at least one layer)."""
    lo = n // 3
    return range(lo, max(lo + 1, (2 * n + 2) // 3))


def mid_layer_mlp(diag: dict) -> float | None:
    """Relative update of the MLP weights of the middle third of the layers (norm-aggregated
    as sqrt(mean of squared per-cell values), i.e. equal weight per cell)."""
    cells = diag.get("rel_update_by_layer_module", {})
    n = max((len(v) for v in cells.values()), default=0)
    if n == 0:
        return None
    vals = [cells[m][i] for m in MLP if m in cells for i in mid_layers(n) if cells[m][i] is not None]
    return (sum(v * v for v in vals) / len(vals)) ** 0.5 if vals else None


def mid_layer_mlp_share(diag: dict) -> float | None:
    """Share of a method's update energy in the mid-layer MLP matrices:

        sum ||dW||_F^2 over gate/up/down_proj of the middle third of the layers
        / sum ||dW||_F^2 over every linear matrix (q, k, v, o, gate, up, down) of every layer,

    from the `update_sq_by_layer_module` cells. Scaling a method's whole update by c scales both
    sums by c^2, so the share does not depend on the learning rate's overall size. None without
    the cells or when the linear matrices did not move."""
    cells = {m: v for m, v in (diag.get("update_sq_by_layer_module") or {}).items() if m in LINEAR}
    n = max((len(v) for v in cells.values()), default=0)
    total = sum(x for v in cells.values() for x in v if x is not None)
    if n == 0 or total <= 0:
        return None
    mid = sum(x for m in MLP if m in cells for i in mid_layers(n) if i < len(cells[m]) and (x := cells[m][i]) is not None)
    return mid / total


MLP_CLAIM = ("SFT moves mid-layer MLP weights more than RL, independently of the learning rate (rule: the share of "
             "each method's update energy, sum of ||dW||_F^2, that falls in the MLP matrices of the middle third of "
             "the layers, out of all the layers' linear matrices; SFT's share over RL's share > 1.5).")


@finding("sft_moves_mlp_more", MLP_CLAIM, paper="arXiv 2507.10616")
def sft_moves_mlp_more(ctx: Context):
    if ctx.sft is None or ctx.rl is None:
        return None, ctx.missing("sft", "rl")
    ms, mr = (mid_layer_mlp_share(ctx.diagnostics.get(n, {})) for n in (ctx.sft, ctx.rl))
    if ms is None or mr is None or mr == 0:
        return None, "no per-layer update energy of the linear matrices (update_sq_by_layer_module)"
    return Measured(ms / mr, 1.5, None,
                    f"mid-layer MLP share of the update energy {ctx.sft} {ms:.3f} vs {ctx.rl} {mr:.3f} (ratio {ms / mr:.2f})")


QK_CLAIM = ("Attention query/key weights change most (rule: per linear module type, the relative update "
            "||dW||_F / ||W_base||_F of its matrices over all layers taken together, sqrt(sum ||dW||_F^2) / "
            "sqrt(sum ||W_base||_F^2), as in Scalpel vs Hammer, so that a module's weight scale does not decide; "
            "the top module is q_proj or k_proj, for the SFT and the RL method).")


@finding("qk_change_most", QK_CLAIM, paper="arXiv 2507.10616")
def qk_change_most(ctx: Context):
    qk = []
    diag = ctx.diagnostics
    for name in (n for n in (ctx.sft, ctx.rl) if n is not None and n in diag):
        by_mod = {m: v for m, v in diag[name].get("rel_update_by_module", {}).items() if m in LINEAR}
        if by_mod and max(by_mod.values()) > 0:  # a method that never updated has no "top" module
            ranked = sorted(by_mod, key=by_mod.get, reverse=True)
            qk.append((name, ranked[0] in ("q_proj", "k_proj"), ", ".join(f"{m} {by_mod[m]:.2e}" for m in ranked[:3])))
    return (all(h for _, h, _ in qk) if qk else None), ("; ".join(f"{n}: top {ev}" for n, _, ev in qk) or "no diagnostics")
