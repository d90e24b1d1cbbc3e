"""Small helpers with TransformerLens's names: ``get_act_name``."""

from __future__ import annotations

# Short names -> (where the site lives, its hook name). "block" sites take a layer.
_ALIASES = {
    "embed": "hook_embed", "pos_embed": "hook_pos_embed",
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "mlp_in": "hook_mlp_in", "attn_in": "hook_attn_in",
    "q_input": "hook_q_input", "k_input": "hook_k_input", "v_input": "hook_v_input",
    "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "z": "attn.hook_z",
    "rot_q": "attn.hook_rot_q", "rot_k": "attn.hook_rot_k",
    "attn_scores": "attn.hook_attn_scores", "scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern", "attn": "attn.hook_pattern", "result": "attn.hook_result",
    "pre": "mlp.hook_pre", "pre_linear": "mlp.hook_pre_linear", "post": "mlp.hook_post",
    "mlp_pre": "mlp.hook_pre", "mlp_post": "mlp.hook_post",
}
_TOP_LEVEL = {"embed", "pos_embed"}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None,
                 n_layers: int | None = None) -> str:
    """TransformerLens's shorthand: ``get_act_name("resid_post", 3) == "blocks.3.hook_resid_post"``.

    ``("scale", 2, "ln1")`` -> ``blocks.2.ln1.hook_scale``; ``("scale",)`` -> ``ln_final.hook_scale``;
    ``("normalized", 2, "ln2")`` likewise. A full hook name passes through. Negative layers
    count from the end when ``n_layers`` is given.
    """
    if "." in name or name.startswith("hook_"):
        return name
    if layer is not None and layer < 0:
        if n_layers is None:
            raise ValueError(f"negative layer {layer} needs n_layers")
        layer += n_layers
    if name in ("scale", "normalized"):
        if layer is None:
            return f"ln_final.hook_{name}"
        ln = layer_type or "ln1"
        if ln not in ("ln1", "ln2"):
            raise ValueError(f"layer_type for {name!r} must be 'ln1' or 'ln2', got {ln!r}")
        return f"blocks.{layer}.{ln}.hook_{name}"
    if name not in _ALIASES:
        raise ValueError(f"unknown activation name {name!r}; known short names: {sorted(_ALIASES) + ['scale', 'normalized']}")
    site = _ALIASES[name]
    if name in _TOP_LEVEL:
        return site
    if layer is None:
        raise ValueError(f"{name!r} is a per-layer site: give a layer, e.g. get_act_name({name!r}, 0)")
    return f"blocks.{layer}.{site}"
