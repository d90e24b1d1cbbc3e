"""The command line: direct logit attribution, logit lens, and parity with HF transformers.

    python -m transformer_hooks dla --prompt "The capital of France is" --answer " Paris" --contrast " London"
    python -m transformer_hooks logit-lens --prompt "The capital of France is" [--pos -1]
    python -m transformer_hooks parity --model gpt2 [--tol 1e-3]

The model defaults to the embedded SmolLM2-135M-Instruct. ``dla`` and ``logit-lens`` load
it with TransformerLens's default weight processing (``--no-processing`` for the raw
weights; the attributions are the same either way, see ``ActivationCache.apply_ln_to_stack``),
print a table, and write a PNG into ``--out``. ``parity`` exits with 1 when any layer's
error exceeds ``--tol``, so it can gate a CI job. The computations are plain functions
(``direct_logit_attribution``, ``parity_errors``) that return what the tables print.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from .resolution import DEFAULT_MODEL

DEFAULT_PROMPT = "The capital of France is"


# Loading ------------------------------------------------------------------------------
def load_model(name: str, no_processing: bool = False, device: str | None = None) -> Any:
    from .model import HookedTransformer

    if no_processing:
        return HookedTransformer.from_pretrained_no_processing(name, device=device)
    return HookedTransformer.from_pretrained(name, device=device)


def _check_prompt(prompt: str) -> None:
    if not prompt:
        raise ValueError("empty prompt: pass the text to analyse, e.g. --prompt \"The capital of France is\"")


def _position(pos: int, n_tokens: int) -> int:
    if not -n_tokens <= pos < n_tokens:
        raise ValueError(f"--pos {pos} is out of range for a prompt of {n_tokens} tokens "
                         f"(valid: {-n_tokens}..{n_tokens - 1})")
    return pos % n_tokens


# Direct logit attribution ---------------------------------------------------------------
@dataclass
class DLAResult:
    """Direct effects on ``logit(answer) - logit(contrast)`` at one position.

    ``logit_diff = embed + attn.sum() + mlp.sum() + constant`` exactly, where
    ``constant`` is what no component writes (``b_U`` and an unfolded LayerNorm's bias),
    and ``attn[l] = heads[l].sum() + (b_O[l]'s effect)``.
    """

    str_tokens: list[str]
    pos: int
    answer: str
    contrast: str
    answer_logit: float
    contrast_logit: float
    logit_diff: float
    accumulated: Float[torch.Tensor, "row"]  # the logit difference the residual stream would give at each point
    accumulated_labels: list[str]
    heads: Float[torch.Tensor, "layer head"]
    attn: Float[torch.Tensor, "layer"]
    mlp: Float[torch.Tensor, "layer"]
    embed: float
    constant: float


def direct_logit_attribution(model: Any, prompt: str, answer: str, contrast: str, pos: int = -1) -> DLAResult:
    """Run ``prompt`` and attribute the logit difference at ``pos`` to heads and layers.

    Every part goes through the final norm with its cached scale
    (``cache.apply_ln_to_stack``), so the parts add up to the model's logit difference.
    """
    _check_prompt(prompt)
    a, b = model.to_single_token(answer), model.to_single_token(contrast)
    if a == b:
        raise ValueError(f"--answer {answer!r} and --contrast {contrast!r} are the same token ({a}); "
                         f"their logit difference is 0 by definition")
    tokens = model.to_tokens(prompt)
    pos = _position(pos, tokens.shape[1])
    suffixes = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                "attn.hook_z", "hook_embed", "hook_pos_embed", "ln_final.hook_scale")
    wanted = lambda name: name.endswith(suffixes)  # noqa: E731
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=wanted)
        cfg = model.cfg
        direction = model.tokens_to_residual_directions(a) - model.tokens_to_residual_directions(b)
        b_U = model.b_U
        constant = b_U[a] - b_U[b]
        if getattr(model.ln_final, "b", None) is not None:
            constant = constant + model.ln_final.b @ direction

        from .lens import final_norm

        acc, acc_labels = cache.accumulated_resid(-1, incl_mid=True, pos_slice=pos, return_labels=True)
        accumulated = final_norm(model, acc, "cached", cache, pos_slice=pos) @ direction + (b_U[a] - b_U[b])
        heads = cache.logit_attrs(cache.stack_head_results(-1, pos_slice=pos), a, b, pos_slice=pos)
        parts, labels = cache.decompose_resid(-1, pos_slice=pos, return_labels=True)
        part_attrs = dict(zip(labels, cache.logit_attrs(parts, a, b, pos_slice=pos)[:, 0].tolist()))
    layers = range(cfg.n_layers)
    return DLAResult(
        str_tokens=model.to_str_tokens(tokens[0]), pos=pos, answer=answer, contrast=contrast,
        answer_logit=float(logits[0, pos, a]), contrast_logit=float(logits[0, pos, b]),
        logit_diff=float(logits[0, pos, a] - logits[0, pos, b]),
        accumulated=accumulated[:, 0].cpu(), accumulated_labels=acc_labels,
        heads=heads[:, 0].reshape(cfg.n_layers, cfg.n_heads).cpu(),
        attn=torch.tensor([part_attrs[f"{l}_attn_out"] for l in layers]),
        mlp=torch.tensor([part_attrs[f"{l}_mlp_out"] for l in layers]),
        embed=part_attrs["embed"] + part_attrs.get("pos_embed", 0.0), constant=float(constant),
    )


def format_dla(r: DLAResult, top: int = 10) -> str:
    n_layers, n_heads = r.heads.shape
    total = r.embed + float(r.attn.sum()) + float(r.mlp.sum()) + r.constant
    lines = [
        f"prompt: {''.join(r.str_tokens)!r} ({len(r.str_tokens)} tokens); predicting after position {r.pos} "
        f"({r.str_tokens[r.pos]!r})",
        f"logit({r.answer!r}) = {r.answer_logit:.4f}   logit({r.contrast!r}) = {r.contrast_logit:.4f}",
        f"logit difference = {r.logit_diff:.4f}",
        f"  = embeddings {r.embed:+.4f} + attention {float(r.attn.sum()):+.4f} + MLPs {float(r.mlp.sum()):+.4f}"
        f" + unembedding/norm biases {r.constant:+.4f} (sum {total:.4f})",
        "",
        f"Top {min(top, n_layers * n_heads)} heads by |direct contribution| to the logit difference",
    ]
    flat = r.heads.flatten()
    order = flat.abs().argsort(descending=True)[:top].tolist()
    rows = [[str(i + 1), f"L{j // n_heads}H{j % n_heads}", f"{float(flat[j]):+.4f}"] for i, j in enumerate(order)]
    lines += _table(["rank", "head", "contribution"], rows)
    lines += ["", f"Top {min(top, n_layers)} layers by |direct contribution| (attention incl. b_O, MLP incl. b_out)"]
    per_layer = r.attn + r.mlp
    order = per_layer.abs().argsort(descending=True)[:top].tolist()
    rows = [[str(i + 1), str(l), f"{float(r.attn[l]):+.4f}", f"{float(r.mlp[l]):+.4f}", f"{float(per_layer[l]):+.4f}"]
            for i, l in enumerate(order)]
    lines += _table(["rank", "layer", "attn", "mlp", "total"], rows)
    return "\n".join(lines)


def plot_dla(r: DLAResult, path: Path) -> Path:
    n_layers, n_heads = r.heads.shape
    fig = _figure(figsize=(15, max(5.0, 0.22 * n_layers + 2.5)))
    ax_line, ax_heat = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    diff = f"logit({_tex(repr(r.answer))}) − logit({_tex(repr(r.contrast))})"
    fig.suptitle(f"Direct logit attribution: {diff} after {_tex(repr(''.join(r.str_tokens[:r.pos + 1])))}\n"
                 f"model logit difference = {r.logit_diff:.3f}", fontsize=12)

    x = range(len(r.accumulated))
    ax_line.axhline(0, color="0.6", lw=0.8)
    ax_line.plot(x, r.accumulated.numpy(), marker="o", ms=3, lw=1.5, color="tab:blue",
                 label="accumulated residual stream")
    ax_line.axhline(r.logit_diff, color="tab:red", ls="--", lw=1,
                    label=f"model's logit difference ({r.logit_diff:.3f})")
    step = max(1, len(r.accumulated_labels) // 24)
    ax_line.set_xticks(list(x)[::step], [_tex(s) for s in r.accumulated_labels[::step]], rotation=60, ha="right",
                       fontsize=8)
    ax_line.set_xlabel("residual stream position (resid_pre / resid_mid of each layer, final resid_post)")
    ax_line.set_ylabel(f"{diff}\n(final norm with its cached scale)")
    ax_line.set_title("Accumulated logit difference by layer")
    ax_line.grid(alpha=0.3)
    ax_line.legend(loc="best", fontsize=9)

    heads = r.heads.numpy()
    vmax = max(float(abs(heads).max()), 1e-6)
    im = ax_heat.imshow(heads, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    ax_heat.set_xlabel("head")
    ax_heat.set_ylabel("layer")
    ax_heat.set_xticks(range(n_heads))
    ax_heat.set_yticks(range(0, n_layers, max(1, n_layers // 30)))
    ax_heat.set_title("Direct contribution of each head")
    for l in range(n_layers):
        for h in range(n_heads):
            if abs(heads[l, h]) >= 0.3 * vmax:
                ax_heat.text(h, l, f"{heads[l, h]:+.2f}", ha="center", va="center", fontsize=7,
                             color="white" if abs(heads[l, h]) > 0.65 * vmax else "black")
    fig.colorbar(im, ax=ax_heat, label=f"direct effect on {diff}")
    fig.set_layout_engine("tight")
    return _save(fig, path)


# Logit lens ------------------------------------------------------------------------------
LENS_COLUMNS = ("resid_post", "attn_out", "mlp_out")


def format_logit_lens(lens: Any, model: Any, str_tokens: list[str], pos: int, top: int = 3) -> str:
    """Top tokens (probability) at ``pos`` per layer: the embeddings, then each layer's
    residual stream after it, and its attention and MLP outputs decoded alone."""
    strings = lens.top_strings(model)

    def cell(row: int) -> str:
        return "  ".join(f"{_short(strings[row][0][pos][k])} {float(lens.top_probs[row, 0, pos, k]):.2f}"
                         for k in range(min(top, lens.top_tokens.shape[-1])))

    index = {label: i for i, label in enumerate(lens.labels)}
    rows = [["embed", cell(index["0_resid_pre"]), "", ""]]
    for layer in sorted(set(lens.layers)):
        rows.append([str(layer)] + [cell(index[f"{layer}_{site}"]) for site in LENS_COLUMNS])
    head = [f"Logit lens at position {pos} ({str_tokens[pos]!r}): top {top} tokens (probability) of each "
            f"vector through the final norm and unembedding", ""]
    return "\n".join(head + _table(["layer", "residual stream after the layer", "attention output",
                                    "MLP output"], rows))


def plot_logit_lens(lens: Any, model: Any, str_tokens: list[str], pos: int, path: Path,
                    max_positions: int = 12) -> Path:
    """Left: the residual stream after each layer, layer x position (up to
    ``max_positions`` around ``pos``). Right: the attention and MLP outputs of each layer
    at ``pos``, decoded alone. Each cell shows the top token, coloured by its probability."""
    from matplotlib.patches import Rectangle

    n_pos = len(str_tokens)
    first = max(0, min(pos - max_positions // 2, n_pos - max_positions))
    shown = list(range(first, min(n_pos, first + max_positions)))
    strings = lens.top_strings(model)
    layers = sorted(set(lens.layers))
    fig = _figure(figsize=(3.5 + 0.95 * (len(shown) + 2), 0.27 * len(layers) + 2.6), layout="constrained")
    ax_resid, ax_out = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [len(shown), 2]})

    def heatmap(ax: Any, cells: list[tuple[int, int]]) -> Any:
        """cells[j] = (lens row of layer 0, position); rows of later layers follow per site."""
        probs = torch.stack([lens.top_probs[rows, 0, p, 0] for rows, p in cells], dim=1).numpy()  # [layer, column]
        im = ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        for j, (rows, p) in enumerate(cells):
            for i, row in enumerate(rows):
                ax.text(j, i, _tex(_short(strings[row][0][p][0], 11)), ha="center", va="center", fontsize=7.5,
                        color="white" if probs[i, j] > 0.6 else "black")
        return im

    resid_rows = lens.rows("resid_post")
    im = heatmap(ax_resid, [(resid_rows, p) for p in shown])
    ax_resid.set_xticks(range(len(shown)), [_tex(repr(str_tokens[p])) for p in shown], rotation=60, ha="right",
                        fontsize=8)
    ax_resid.add_patch(Rectangle((shown.index(pos) - 0.5, -0.5), 1, len(layers), fill=False, ec="tab:red", lw=2))
    ax_resid.set_xlabel("input token (the next token is predicted)")
    ax_resid.set_ylabel("layer")
    ax_resid.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax_resid.set_title("residual stream after each layer")

    heatmap(ax_out, [(lens.rows("attn_out"), pos), (lens.rows("mlp_out"), pos)])
    ax_out.set_xticks([0, 1], ["attention\noutput", "MLP\noutput"], fontsize=8)
    ax_out.set_xlabel(f"at position {pos}: {_tex(repr(str_tokens[pos]))}")
    ax_out.set_title("each sublayer's output alone")
    fig.colorbar(im, ax=[ax_resid, ax_out], label="probability of the top token", shrink=0.8, aspect=40)
    fig.suptitle(f"Logit lens: top token of each vector through the final norm and unembedding "
                 f"(red box: position {pos})", fontsize=12)
    return _save(fig, path)


# Parity ---------------------------------------------------------------------------------
@dataclass
class ParityRow:
    name: str
    max_abs_error: float
    max_abs_value: float


def load_hf_model(name: str) -> Any:
    """The same checkpoint through HF transformers (float32): an HF directory, repo id,
    preset or .gguf file (through transformers' ``gguf_file``)."""
    from transformers import AutoModelForCausalLM

    from .resolution import resolve_checkpoint

    ckpt = resolve_checkpoint(name)
    if ckpt.kind == "converted":
        raise ValueError(f"{name!r} is a checkpoint converted by transformer_hooks; HF transformers cannot load it. "
                         f"Run parity on the original HF checkpoint or .gguf file")
    if ckpt.kind == "gguf":
        return AutoModelForCausalLM.from_pretrained(str(ckpt.directory), gguf_file=ckpt.gguf_file.name,
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(ckpt.directory), dtype=torch.float32).eval()


def parity_errors(model: Any, hf_model: Any, tokens: torch.Tensor) -> list[ParityRow]:
    """Max abs differences, ours vs HF: the residual stream entering each layer (HF's
    ``hidden_states[l]``), the final norm's output and the logits."""
    n = model.cfg.n_layers
    with torch.no_grad():
        ref = hf_model(tokens, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_pre")
                                             or name == f"blocks.{n - 1}.hook_resid_post")
        final = model.ln_final(cache["resid_post", -1])

    def row(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> ParityRow:
        return ParityRow(name, float((ours.float() - theirs.float()).abs().max()), float(theirs.abs().max()))

    rows = [row(f"resid_pre {l}", cache["resid_pre", l], ref.hidden_states[l]) for l in range(n)]
    rows.append(row("final norm", final, ref.hidden_states[n]))
    rows.append(row("logits", logits, ref.logits))
    return rows


def format_parity(rows: list[ParityRow], tol: float) -> str:
    table = [[r.name, f"{r.max_abs_error:.3e}", f"{r.max_abs_value:.3g}", "ok" if r.max_abs_error <= tol else "FAIL"]
             for r in rows]
    return "\n".join(_table(["site", "max |ours - HF|", "max |HF|", f"tol {tol:g}"], table))


# Commands ---------------------------------------------------------------------------------
class _Steps:
    """A progress bar over a command's steps, shown only once they take over a second."""

    def __init__(self, desc: str, total: int) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="step", delay=1.0, leave=False)
        self.started = False

    def __call__(self, label: str) -> None:
        if self.started:
            self.bar.update()
        self.started = True
        self.bar.set_postfix_str(label)

    def __enter__(self) -> "_Steps":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


def cmd_dla(args: argparse.Namespace) -> int:
    _check_prompt(args.prompt)
    with _Steps("dla", 3) as step:
        step("loading the model")
        model = load_model(args.model, args.no_processing, args.device)
        step("running and attributing")
        result = direct_logit_attribution(model, args.prompt, args.answer, args.contrast, args.pos)
        step("plotting")
        path = plot_dla(result, Path(args.out) / "dla.png")
    print(format_dla(result, args.top))
    print(f"\nwrote {path}")
    return 0


def cmd_logit_lens(args: argparse.Namespace) -> int:
    from .lens import logit_lens

    _check_prompt(args.prompt)
    with _Steps("logit lens", 3) as step:
        step("loading the model")
        model = load_model(args.model, args.no_processing, args.device)
        tokens = model.to_tokens(args.prompt)
        pos = _position(args.pos, tokens.shape[1])
        step("decoding every layer")
        lens = logit_lens(model, tokens, sites=("resid_pre",) + LENS_COLUMNS, top_k=max(args.top, 1))
        str_tokens = model.to_str_tokens(tokens[0])
        step("plotting")
        path = plot_logit_lens(lens, model, str_tokens, pos, Path(args.out) / "logit_lens.png")
    print(format_logit_lens(lens, model, str_tokens, pos, args.top))
    print(f"\nwrote {path}")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    with _Steps("parity", 3) as step:
        step("loading with transformer_hooks")
        model = load_model(args.model, no_processing=True)
        step("loading with HF transformers")
        hf_model = load_hf_model(args.model)
        step("running both")
        if model.tokenizer is not None:
            _check_prompt(args.prompt)
            tokens = model.to_tokens(args.prompt)
        else:  # a checkpoint without a tokenizer: fixed random tokens
            tokens = torch.randint(0, model.cfg.d_vocab, (1, 16), generator=torch.Generator().manual_seed(0))
        rows = parity_errors(model, hf_model, tokens)
    print(f"parity of {args.model} ({model.cfg.n_layers} layers, {tokens.shape[1]} tokens, float32): "
          f"transformer_hooks vs HF transformers")
    print(format_parity(rows, args.tol))
    failed = [r.name for r in rows if not r.max_abs_error <= args.tol]
    if failed:
        print(f"\nFAIL: {len(failed)} site(s) past the tolerance {args.tol:g}, first: {failed[0]}")
        return 1
    print(f"\nok: every site within {args.tol:g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transformer-hooks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{dla,logit-lens,parity,plan,sweep}")

    def model_args(p: argparse.ArgumentParser, top: int) -> None:
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"preset, HF repo id, local directory or .gguf file (default: {DEFAULT_MODEL}, embedded)")
        p.add_argument("--no-processing", action="store_true", help="load the weights unprocessed (no fold_ln etc.)")
        p.add_argument("--device", default=None, help="torch device (default: cpu)")
        p.add_argument("--out", default=".", help="directory for the PNG (default: current directory)")
        p.add_argument("--top", type=int, default=top, help=f"how many top entries to show (default: {top})")

    dla = sub.add_parser("dla", help="direct logit attribution of logit(answer) - logit(contrast) to heads and layers")
    dla.add_argument("--prompt", required=True)
    dla.add_argument("--answer", required=True, help="the answer token, e.g. ' Paris' (note the leading space)")
    dla.add_argument("--contrast", required=True, help="the token to compare with, e.g. ' London'")
    dla.add_argument("--pos", type=int, default=-1, help="position whose next-token logits to explain (default: -1)")
    model_args(dla, top=10)
    dla.set_defaults(func=cmd_dla)

    lens = sub.add_parser("logit-lens", help="top tokens of every layer's residual stream, attention and MLP output")
    lens.add_argument("--prompt", required=True)
    lens.add_argument("--pos", type=int, default=-1, help="position for the table (default: -1, the last)")
    model_args(lens, top=3)
    lens.set_defaults(func=cmd_logit_lens)

    parity = sub.add_parser("parity", help="compare every layer with HF transformers; exit 1 past --tol")
    parity.add_argument("--model", required=True, help="preset, HF repo id, local HF directory or .gguf file")
    parity.add_argument("--tol", type=float, default=1e-3, help="max abs error allowed (default: 1e-3)")
    parity.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text to run (default: {DEFAULT_PROMPT!r})")
    parity.set_defaults(func=cmd_parity)

    from .distributed import add_sweep_parser
    from .plan import add_plan_parser

    add_plan_parser(sub)
    add_sweep_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"transformer-hooks {args.command}: error: {e}", file=sys.stderr)
        return 2


# Helpers -------------------------------------------------------------------------------------
def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Plain-text columns: numbers right-aligned, text left-aligned."""
    columns = list(zip(headers, *rows))
    widths = [max(map(len, col)) for col in columns]
    numeric = [bool(rows) and all(_numeric(c) for c in col[1:]) for col in columns]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    return [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def _numeric(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _short(token: str, width: int = 12) -> str:
    text = repr(token)
    return text if len(text) <= width else text[: width - 2] + "…'"


def _tex(text: str) -> str:
    """Text for matplotlib: '$' would start math mode."""
    return text.replace("$", r"\$")


def _figure(**kwargs: Any) -> Any:
    # A bare Figure renders with the Agg canvas and touches no pyplot state, so these
    # plots work headless and never change a notebook's backend.
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
