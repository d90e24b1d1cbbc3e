"""What code that works with a model reads of it: ``HookedModel``, a ``typing.Protocol``.

The runtime (cache, generate, trace) and the workflows (lens, patching, SAEs, ...) take a
model and read its config, blocks, weights, hook registry and tokenizer through this
protocol, not through ``HookedTransformer``'s class. So they sit below (or beside) the model
in the import order, the model imports them, and mypy still checks what they read.
``HookedTransformer`` satisfies it (model.py checks that for mypy); so may any other model
with the same members.

It names only what those modules use; a member missing here is one nothing outside the model
reads. It sits with hooks.py, below the components: the modules (blocks, norms, embeddings) appear
as the ``nn.Module`` they are, and the cache a run returns (cache.py, above) as ``Any``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from jaxtyping import Float, Int
from torch import nn

from .config import ModelConfig
from .factored_matrix import FactoredMatrix
from .hooks import HookFn, HookPoint, NameFilter
from .tokens import ModelInput, PaddingSide, TextInput


class Blocks(Protocol):
    """What code reads of ``model.blocks`` (components/stack.py's ``BlockStack``): the blocks by
    index, and how values reach the process that needs them when the model is split over
    processes (on one process, they stay where they are)."""

    def __getitem__(self, index: int) -> Any: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[nn.Module]: ...
    @property
    def gets_output(self) -> bool:
        """``BlockStack.gets_output``: this process gets the output and ``run_with_cache``'s cache."""

    def process_boundaries(self) -> list[int]:
        """``BlockStack.process_boundaries``: the blocks where the forward moves to another process."""

    @property
    def processes(self) -> int:
        """``BlockStack.processes``: how many processes run the model's one forward."""

    def to_sites(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``BlockStack.to_sites``: ``tensors`` on the process that runs each hook."""

    def share(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``BlockStack.share``: ``tensors`` on every process."""

    def from_sites(self, tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor] | None:
        """``BlockStack.from_sites``: the ``names`` of each process's ``tensors`` where the output is."""

    def grad(self, value: torch.Tensor | None, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """``BlockStack.grad``: d ``value`` / d ``inputs`` across processes."""

    def same_random_state(self) -> None:
        """``BlockStack.same_random_state``: every process draws what the first draws."""


class HookedModel(Protocol):
    """A transformer with TransformerLens's hook names and API, as the runtime and workflows
    read it (``HookedTransformer`` is one)."""

    cfg: ModelConfig
    tokenizer: Any  # a HF tokenizer, or None for a model run on token ids only

    # Modules ---------------------------------------------------------------------------
    @property
    def blocks(self) -> Blocks:
        """The transformer blocks in order (``HookedTransformer.blocks``, a ``BlockStack``)."""

    @property
    def ln_final(self) -> nn.Module:
        """The final norm, applied to the residual stream before the unembedding."""

    @property
    def unembed(self) -> nn.Module:
        """The unembedding (``W_U``, ``b_U``): residual stream -> logits."""

    @property
    def device(self) -> torch.device:
        """The device of the embeddings (where inputs go); see ``block_devices`` for a split model."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights."""

    @property
    def block_devices(self) -> list[torch.device]:
        """The device each block runs on (where its KV cache lives)."""

    # Running ----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Sample a continuation: see ``HookedTransformer.generate`` for ``args`` and ``kwargs``."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The forward pass: see ``HookedTransformer.forward`` for ``args`` and ``kwargs``."""

    # Hooks (hooks.HookedRootModule) -------------------------------------------------------
    hook_dict: dict[str, HookPoint]  # every site by name (an SAE spliced in adds its own)

    def resolve_hook_names(self, names: NameFilter) -> list[str]:
        """The hook names ``names`` selects (see ``hooks.HookedRootModule.resolve_hook_names``)."""

    @property
    def tl_flags(self) -> frozenset[str]:
        """The TransformerLens ``use_*`` switches that are on."""

    def cache_names(self, names_filter: NameFilter) -> list[str]:
        """The hook names ``names_filter`` selects for caching (see ``hooks.HookedRootModule.cache_names``)."""

    def hooks(
        self,
        fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        bwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> AbstractContextManager[Any]:
        """Context manager attaching hooks: ``fwd_hooks``, ``bwd_hooks``, ``reset_hooks_end`` and
        ``clear_contexts`` as in ``hooks.HookedRootModule.hooks``.
        """

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        bwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """Forward pass with hooks: ``model_args``, ``model_kwargs``, ``fwd_hooks``, ``bwd_hooks``,
        ``reset_hooks_end`` and ``clear_contexts`` as in ``hooks.HookedRootModule.run_with_hooks``.
        """

    def run_with_cache(
        self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs: Any
    ) -> tuple[Any, Any]:
        """Forward pass returning (output, cache): ``model_args``, ``kwargs``, ``return_cache_object`` and
        ``remove_batch_dim`` as in ``HookedTransformer.run_with_cache``.
        """

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: str = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Remove hooks: ``clear_contexts``, ``direction``, ``including_permanent`` and ``level`` as in
        ``hooks.HookedRootModule.reset_hooks``.
        """

    # Tokens (tokens.py) ----------------------------------------------------------------
    def tokens_and_mask(
        self,
        input: ModelInput,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens and padding mask of ``input``: ``prepend_bos``, ``padding_side`` and ``attention_mask``
        as in ``tokens.TokenMethods.tokens_and_mask``.
        """

    def to_tokens(
        self,
        input: TextInput,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[torch.Tensor, "batch pos"]:
        """Token ids of ``input``: ``prepend_bos``, ``padding_side``, ``move_to_device`` and ``truncate``
        as in ``tokens.TokenMethods.to_tokens``.
        """

    def to_string(self, tokens: Int[torch.Tensor, "... pos"] | int | Sequence[int]) -> str | list[str]:
        """Decode ``tokens`` (see ``tokens.to_string``)."""

    def to_str_tokens(
        self,
        input: str | torch.Tensor | Sequence[int],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> list[str] | list[list[str]]:
        """One string per token of ``input``: ``prepend_bos`` and ``padding_side`` as in ``tokens.to_str_tokens``."""

    def to_single_token(self, string: str) -> int:
        """The id of ``string``, which must be one token (see ``tokens.to_single_token``)."""

    # Weights and directions (weight_views.py) ----------------------------------------------
    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        """The unembedding matrix [d_model, d_vocab]."""

    @property
    def b_U(self) -> Float[torch.Tensor, " d_vocab"]:
        """The unembedding bias [d_vocab]."""

    @property
    def QK(self) -> FactoredMatrix:
        """Every head's QK circuit as a ``FactoredMatrix`` (see ``weight_views.WeightViews.QK``)."""

    @property
    def OV(self) -> FactoredMatrix:
        """Every head's OV circuit as a ``FactoredMatrix`` (see ``weight_views.WeightViews.OV``)."""

    def tokens_to_residual_directions(
        self, tokens: str | int | Sequence[int] | Sequence[str] | torch.Tensor
    ) -> Float[torch.Tensor, "... d_model"]:
        """The unembedding direction of each of ``tokens`` (see ``weight_views.WeightViews``)."""

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[torch.Tensor, " d_model"]:
        """The bias summed into the residual stream before ``layer``: ``mlp_input`` and
        ``include_mlp_biases`` as in ``weight_views.WeightViews.accumulated_bias``.
        """

    # nn.Module ---------------------------------------------------------------------------
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """``nn.Module.parameters`` (``recurse``)."""

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """``nn.Module.named_parameters`` (``prefix``, ``recurse``, ``remove_duplicate``)."""

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.to``: ``args`` and ``kwargs`` name a device and/or dtype."""

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict`` (``args``, ``kwargs`` as there)."""

    def register_forward_pre_hook(
        self, hook: Callable[..., Any], *, prepend: bool = False, with_kwargs: bool = False
    ) -> Any:
        """``nn.Module.register_forward_pre_hook`` (``hook``, ``prepend``, ``with_kwargs``)."""
