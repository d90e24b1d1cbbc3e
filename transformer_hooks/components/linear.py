"""``x · Wᵀ + b`` as ``F.linear``, without paying for a bias that is all zeros.

On CPU, ``F.linear`` with a bias is ``addmm``: it first fills the output with the
broadcast bias, then accumulates the product into it, a whole extra pass over the
output (2-10% of the matmul at transformer sizes). Checkpoints without biases (Llama,
the unembedding of GPT-2 and Pythia) still have zero biases here, because every model
carries TransformerLens's ``b_Q ... b_U``. Checking the bias costs a few microseconds,
so it is done on every call and is never stale. The bias stays in when it needs a
gradient (its gradient is not zero even when it is), and on GPU, where the bias is
fused into the matmul anyway and the check would make the host wait.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float


def linear(
    x: Float[torch.Tensor, "... d_in"],
    weight: Float[torch.Tensor, "d_out d_in"],
    bias: Float[torch.Tensor, " d_out"] | None,
) -> Float[torch.Tensor, "... d_out"]:
    """``x @ weight.T + bias`` (``F.linear``), skipping an all-zero CPU bias that needs no gradient."""
    if (
        bias is not None
        and bias.device.type == "cpu"
        and not (bias.requires_grad and torch.is_grad_enabled())
        and not bias.any()
    ):
        bias = None
    return F.linear(x, weight, bias)
