"""Which keys each query may attend to: causal, optionally windowed, minus padding.

Built once per forward and shared by all layers. ``sdpa_mask(window)`` returns ``None``
when the fused kernel's own ``is_causal`` (or no mask at all, for a single decoding
query) says it exactly, so the common case builds no tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool


@dataclass
class AttentionMask:
    """Which keys each query may attend to in one forward: ``q_len`` queries over ``k_len`` keys
    (earlier cached positions plus this forward's), ``key_is_real`` [batch, key_pos] (None: no
    padding), built on ``device`` and shared by all layers.
    """

    q_len: int
    k_len: int  # keys = earlier cached positions + this forward's positions
    key_is_real: Bool[torch.Tensor, "batch key_pos"] | None  # None: no padding
    device: torch.device
    _built: dict = field(default_factory=dict)

    def allowed(self, window: int | None) -> Bool[torch.Tensor, "batch_or_1 1 pos key_pos"]:
        """True where query i may attend to key j, for attention ``window`` (None: unlimited); built once per window."""
        if window not in self._built:
            q = torch.arange(self.k_len - self.q_len, self.k_len, device=self.device)[:, None]
            k = torch.arange(self.k_len, device=self.device)[None, :]
            ok = k <= q
            if window is not None:
                ok = ok & (q - k < window)
            ok = ok[None, None]
            if self.key_is_real is not None:
                ok = ok & self.key_is_real[:, None, None, :]
                # A padding query sees no real key; let it see itself so its (unused) row is
                # finite instead of NaN. Real queries always see themselves already.
                ok = ok | (q == k)[None, None]
            self._built[window] = ok
        return self._built[window]

    def disallowed(self, window: int | None) -> Bool[torch.Tensor, "batch_or_1 1 pos key_pos"]:
        """``~allowed(window)``, built once per forward: the explicit path fills these with -inf."""
        key = ("not", window)
        if key not in self._built:
            self._built[key] = ~self.allowed(window)
        return self._built[key]

    def sdpa_mask(self, window: int | None) -> Bool[torch.Tensor, "batch_or_1 1 pos key_pos"] | None:
        """The boolean mask for SDPA at ``window``, or None when ``is_causal_for_sdpa`` (or no mask) covers it."""
        return None if self.is_plain(window) else self.allowed(window)

    def is_plain(self, window: int | None) -> bool:
        """Whether the mask is plain causal (no padding, no window narrower than ``window``):
        SDPA's ``is_causal`` path."""
        window_matters = window is not None and window < self.k_len
        return self.key_is_real is None and not window_matters and (self.q_len == self.k_len or self.q_len == 1)

    @property
    def is_causal_for_sdpa(self) -> bool:
        """Whether SDPA's ``is_causal`` says it: as many queries as keys, more than one."""
        return self.q_len == self.k_len and self.q_len > 1
