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
    def gets_output(self) -> bool: ...  # this process gets the output and run_with_cache's cache
    def to_sites(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]: ...
    def share(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]: ...
    def from_sites(self, tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor] | None: ...
    def grad(self, value: torch.Tensor | None, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]: ...


class HookedModel(Protocol):
    """A transformer with TransformerLens's hook names and API, as the runtime and workflows
    read it (``HookedTransformer`` is one)."""

    cfg: ModelConfig
    tokenizer: Any  # a HF tokenizer, or None for a model run on token ids only

    # Modules ---------------------------------------------------------------------------
    @property
    def blocks(self) -> Blocks: ...
    @property
    def ln_final(self) -> nn.Module: ...
    @property
    def unembed(self) -> nn.Module: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def block_devices(self) -> list[torch.device]: ...

    # Running ----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def generate(self, *args: Any, **kwargs: Any) -> Any: ...
    def forward(self, *args: Any, **kwargs: Any) -> Any: ...

    # Hooks (hooks.HookedRootModule) -------------------------------------------------------
    hook_dict: dict[str, HookPoint]  # every site by name (an SAE spliced in adds its own)

    def resolve_hook_names(self, names: NameFilter) -> list[str]: ...
    @property
    def tl_flags(self) -> frozenset[str]: ...  # the TransformerLens use_* switches that are on
    def cache_names(self, names_filter: NameFilter) -> list[str]: ...
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        bwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> AbstractContextManager[Any]: ...
    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        bwd_hooks: Sequence[tuple[Any, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> Any: ...
    def run_with_cache(
        self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs: Any
    ) -> tuple[Any, Any]: ...
    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: str = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None: ...

    # Tokens (tokens.py) ----------------------------------------------------------------
    def tokens_and_mask(
        self,
        input: ModelInput,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def to_tokens(
        self,
        input: TextInput,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[torch.Tensor, "batch pos"]: ...
    def to_string(self, tokens: Int[torch.Tensor, "... pos"] | int | Sequence[int]) -> str | list[str]: ...
    def to_str_tokens(
        self,
        input: str | torch.Tensor | Sequence[int],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
    ) -> list[str] | list[list[str]]: ...
    def to_single_token(self, string: str) -> int: ...

    # Weights and directions (weight_views.py) ----------------------------------------------
    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]: ...
    @property
    def b_U(self) -> Float[torch.Tensor, " d_vocab"]: ...
    @property
    def QK(self) -> FactoredMatrix: ...
    @property
    def OV(self) -> FactoredMatrix: ...
    def tokens_to_residual_directions(
        self, tokens: str | int | Sequence[int] | Sequence[str] | torch.Tensor
    ) -> Float[torch.Tensor, "... d_model"]: ...
    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[torch.Tensor, " d_model"]: ...

    # nn.Module ---------------------------------------------------------------------------
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...
    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]: ...
    def to(self, *args: Any, **kwargs: Any) -> Any: ...
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]: ...
    def register_forward_pre_hook(
        self, hook: Callable[..., Any], *, prepend: bool = False, with_kwargs: bool = False
    ) -> Any: ...
