"""Layer reset: put the base model's weights back into a range of layers (optionally embeddings/head).

Jin et al. (arXiv:2508.16546) report that resetting the first ~25% of layers to the base recovers
much of SFT's OOD loss; this repair makes that a one-liner for any layer range or fraction.
"""

from __future__ import annotations

import torch

from posttrain.errors import UserError
from posttrain.repair.base import Repair, register_repair


@register_repair("reset_layers")
class ResetLayers(Repair):
    """Every selected tensor, 1-D norms and biases included, is the base's (cast to the target's dtype,
    so bit for bit the base's when the dtypes agree); everything else is the target's.

    Norms go with their layer because a layer is the unit being reset: mixing a reset attention
    block with the fine-tuned norm that scales its input would be neither model.
    """

    axis = "first_frac"
    help = "Copy the base's weights (norms included) into the named layers; everything else is the target's."

    def check(self) -> None:
        if not self.restricted:
            raise UserError("reset_layers: say what to reset: layers (e.g. 0:6), first_frac, last_frac, "
                            "embeddings or head")

    def apply(self, name: str, base: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        return base.to(targets[0].dtype, copy=True)
