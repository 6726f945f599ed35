"""Layer reset: put the base model's weights back into a range of layers.

Jin et al. (arXiv:2508.16546) report that resetting the first ~25% of layers to the base recovers
much of SFT's OOD loss; this repair makes that a one-liner for any layer range or fraction.

Two scopes (`scope`):

- ``reference`` (default): what the published code resets (RL_Heals_SFT
  ``analysis/svd_recover_by_layer.py``): the chosen layers' 2-D weight matrices plus, always, the
  token embeddings and the LM head (the reference's ``always_replace``); every 1-D tensor (norm
  gains, biases) stays the target's. With tied embeddings the one shared matrix is reset.
- ``layers`` (our earlier behaviour): every tensor of the chosen layers, 1-D norms and biases
  included; the embeddings and the head only when ``embeddings`` / ``head`` add them.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from posttrain.errors import UserError
from posttrain.repair.base import Params, Repair, TensorInfo, register_repair

# the reference's always_replace set: embed_tokens and lm_head (not position embeddings, not norms)
ALWAYS_RESET = ("embed", "lm_head")


@register_repair("reset_layers")
class ResetLayers(Repair):
    """Copy the base's tensors into the target (cast to the target's dtype, so bit for bit the base's
    when the dtypes agree); everything else is the target's.

    scope "reference": the chosen layers' 2-D matrices + token embeddings + LM head, norms kept.
    scope "layers": the chosen layers whole, norms included (a layer as the unit being reset: mixing
    a reset attention block with the fine-tuned norm that scales its input is neither model), plus
    embeddings / head when flagged.
    """

    axis = "first_frac"
    help = ("Copy the base's weights into the named layers. Default scope reference (the published code): the "
            "layers' matrices + token embeddings + LM head, norms kept; --scope layers: the layers whole, norms "
            "included, embeddings/head only with --embeddings/--head.")

    class Params(Params):
        scope: Literal["reference", "layers"] = Field(
            "reference", description="reference: the layers' 2-D matrices + token embeddings + LM head, norms and "
            "biases kept (RL_Heals_SFT); layers: every tensor of the layers, embeddings/head only when flagged.")

    def check(self) -> None:
        p = self.params
        has_layers = any(p[k] is not None for k in ("layers", "first_frac", "last_frac"))
        if p["scope"] == "reference":
            flagged = [k for k in ("embeddings", "head") if p[k]]
            if flagged:
                raise UserError(f"reset_layers: {' and '.join(flagged)} apply to scope 'layers'; scope 'reference' "
                                "always resets the token embeddings and the LM head and never the norms")
            if not has_layers:
                raise UserError("reset_layers: say which layers to reset: layers (e.g. 0:6), first_frac or last_frac")
        elif not self.restricted:
            raise UserError("reset_layers: say what to reset: layers (e.g. 0:6), first_frac, last_frac, "
                            "embeddings or head")

    def in_scope(self, t: TensorInfo, layers: set[int]) -> bool:
        if self.params["scope"] == "layers":
            return super().in_scope(t, layers)
        return len(t.shape) == 2 and (t.layer in layers or (t.layer is None and t.module in ALWAYS_RESET))

    def apply(self, name: str, base: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        return base.to(targets[0].dtype, copy=True)
