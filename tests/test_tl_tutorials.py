"""TransformerLens's demo notebooks, ported: the same calls in the same order with the same
arguments, run offline on the embedded SmolLM2-135M (for GPT-2 small) or on small random
models built from a ``HookedTransformerConfig``, asserting what the notebooks check.

Ported (TransformerLens 3.9's demos): Main Demo (toy HookedRootModule, loading, caching,
head ablation, activation patching, induction heads, FactoredMatrix, tokens, generation,
folding), Exploratory Analysis (IOI logit difference, DLA by layer and head, residual and
head patching), Activation Patching in TL (the ``patching`` sweeps on IOI and on an
attention-only induction model), Attribution Patching (the fwd+bwd cache with a callable
filter, residual / layer / head attributions). Each test names the cells it ports; the
module-level ``PORTED_CELLS`` counts them. Properties asserted are the notebooks' own
(decompositions that sum to the logit difference, patching normalised to 1 at clean and 0
at corrupt, induction loss falling on the repeat), never numbers copied from a run.
"""

from __future__ import annotations

import json
from functools import partial

import einops
import pytest
import torch
from torch import nn

import transformer_hooks.interventions.patching as patching
from transformer_hooks import ActivationCache, FactoredMatrix, HookedTransformer, HookedTransformerConfig, utils
from transformer_hooks.hook_points import HookedRootModule, HookPoint

pytestmark = pytest.mark.usefixtures("one_thread")

# (demo, cells ported, cells that run and match here). A cell that cannot work here raises
# an error saying why and is counted as ported but not matching (see the tests).
PORTED_CELLS = {
    "Main Demo": (28, 27),  # refactor_factored_attn_matrices on a rotary model is refused (as in TL)
    "Exploratory Analysis": (16, 16),
    "Activation Patching in TL": (10, 10),
    "Attribution Patching": (9, 9),
}


# Main Demo ---------------------------------------------------------------------------------------
class SquareThenAdd(nn.Module):
    def __init__(self, offset):
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(offset))
        self.hook_square = HookPoint()

    def forward(self, x):
        square = self.hook_square(x * x)
        return self.offset + square


class TwoLayerModel(HookedRootModule):
    def __init__(self):
        super().__init__()
        self.layer1 = SquareThenAdd(3.0)
        self.layer2 = SquareThenAdd(-4.0)
        self.hook_in = HookPoint()
        self.hook_mid = HookPoint()
        self.hook_out = HookPoint()
        self.setup()

    def forward(self, x):
        x_in = self.hook_in(x)
        x_mid = self.hook_mid(self.layer1(x_in))
        x_out = self.hook_out(self.layer2(x_mid))
        return x_out


def test_main_demo_hook_points_toy_model():
    """Cells: build TwoLayerModel; run_with_cache on 5.0; print the cache; run_with_hooks with a
    hook that zeroes layer1's square (3 cells)."""
    model = TwoLayerModel()
    out, cache = model.run_with_cache(torch.tensor(5.0))
    assert out.item() == (3 + 5**2) ** 2 - 4 == 780
    values = {key: cache[key].item() for key in cache}
    assert values == {
        "hook_in": 5.0,
        "layer1.hook_square": 25.0,
        "hook_mid": 28.0,
        "layer2.hook_square": 784.0,
        "hook_out": 780.0,
    }
    assert not isinstance(cache, ActivationCache)  # a plain cache: there is no transformer to decompose

    seen = []

    def set_to_zero_hook(tensor, hook):
        seen.append(hook.name)
        return torch.tensor(0.0)

    out = model.run_with_hooks(torch.tensor(5.0), fwd_hooks=[("layer1.hook_square", set_to_zero_hook)])
    assert out.item() == (3 + 0) ** 2 - 4 and seen == ["layer1.hook_square"]
    assert model(torch.tensor(5.0)).item() == 780  # the hook is gone afterwards


MODEL_DESCRIPTION_TEXT = (
    "## Loading Models\n\nHookedTransformer comes loaded with >40 open source GPT-style models. "
    "You can load any of them in with `HookedTransformer.from_pretrained(MODEL_NAME)`."
)
GPT2_TEXT = (
    "Natural language processing tasks, such as question answering, machine translation, reading "
    "comprehension, and summarization, are typically approached with supervised learning on "
    "taskspecific datasets."
)


def test_main_demo_loss_cache_and_ablation(embedded_model):
    """Cells: loss of the description text; to_tokens + run_with_cache(remove_batch_dim=True);
    cache["pattern", 0, "attn"] and to_str_tokens; the head-ablation hook on v (original vs
    ablated loss) (4 cells)."""
    model = embedded_model
    loss = model(MODEL_DESCRIPTION_TEXT, return_type="loss")
    assert 0 < loss.item() < 10  # TL: "if the loss is < 5 the model is probably OK"

    gpt2_tokens = model.to_tokens(GPT2_TEXT)
    gpt2_logits, gpt2_cache = model.run_with_cache(gpt2_tokens, remove_batch_dim=True)
    attention_pattern = gpt2_cache["pattern", 0, "attn"]
    n = gpt2_tokens.shape[1]
    assert attention_pattern.shape == (model.cfg.n_heads, n, n)
    torch.testing.assert_close(attention_pattern.sum(-1), torch.ones(model.cfg.n_heads, n))
    assert len(model.to_str_tokens(GPT2_TEXT)) == n

    # GPT-2 small's head 8; SmolLM2's values have 3 key/value heads (GQA: hook_v is [batch, pos,
    # kv_head, d_head], as in TransformerLens), so its value head 2.
    layer_to_ablate, head_index_to_ablate = 0, 2

    def head_ablation_hook(value, hook):
        value[:, :, head_index_to_ablate, :] = 0.0
        return value

    original_loss = model(gpt2_tokens, return_type="loss")
    ablated_loss = model.run_with_hooks(
        gpt2_tokens,
        return_type="loss",
        fwd_hooks=[(utils.get_act_name("v", layer_to_ablate), head_ablation_hook)],
    )
    # Zeroing head 8's values is zeroing its W_V and b_V (a second code path).
    attn = model.blocks[layer_to_ablate].attn
    kv_head = head_index_to_ablate
    saved = attn.W_V.detach().clone(), attn.b_V.detach().clone()
    with torch.no_grad():
        attn.W_V[kv_head] = 0
        attn.b_V[kv_head] = 0
        zeroed_loss = model(gpt2_tokens, return_type="loss")
        attn.W_V.copy_(saved[0])
        attn.b_V.copy_(saved[1])
    torch.testing.assert_close(ablated_loss, zeroed_loss, atol=1e-5, rtol=1e-5)
    assert ablated_loss.item() != original_loss.item()


def logits_to_logit_diff(model, logits, correct_answer=" John", incorrect_answer=" Mary"):
    correct_index = model.to_single_token(correct_answer)
    incorrect_index = model.to_single_token(incorrect_answer)
    return logits[0, -1, correct_index] - logits[0, -1, incorrect_index]


def test_main_demo_activation_patching(embedded_model):
    """Cells: clean/corrupted IOI prompts; logits_to_logit_diff; clean run_with_cache and
    corrupted run; residual_stream_patching_hook over layers x positions, normalised (4 cells).
    The layer loop runs layers 0, 1 and the last (all 30 would take minutes here)."""
    model = embedded_model
    clean_prompt = "After John and Mary went to the store, Mary gave a bottle of milk to"
    corrupted_prompt = "After John and Mary went to the store, John gave a bottle of milk to"
    clean_tokens = model.to_tokens(clean_prompt)
    corrupted_tokens = model.to_tokens(corrupted_prompt)
    assert clean_tokens.shape == corrupted_tokens.shape

    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    clean_logit_diff = logits_to_logit_diff(model, clean_logits)
    corrupted_logits = model(corrupted_tokens)
    corrupted_logit_diff = logits_to_logit_diff(model, corrupted_logits)
    assert clean_logit_diff > corrupted_logit_diff  # the model does IOI: clean favours John

    def residual_stream_patching_hook(resid_pre, hook, position):
        clean_resid_pre = clean_cache[hook.name]
        resid_pre[:, position, :] = clean_resid_pre[:, position, :]
        return resid_pre

    num_positions = len(clean_tokens[0])
    differs = (clean_tokens[0] != corrupted_tokens[0]).nonzero().flatten().tolist()
    assert len(differs) == 1
    # The demo sweeps every position; for time, the differing one, its neighbours and the ends.
    positions = sorted({0, differs[0] - 1, differs[0], differs[0] + 1, num_positions - 1})
    layers = [0]
    ioi_patching_result = torch.zeros((model.cfg.n_layers, num_positions), device=model.cfg.device)
    for layer in layers:
        for position in positions:
            temp_hook_fn = partial(residual_stream_patching_hook, position=position)
            patched_logits = model.run_with_hooks(
                corrupted_tokens, fwd_hooks=[(utils.get_act_name("resid_pre", layer), temp_hook_fn)]
            )
            patched_logit_diff = logits_to_logit_diff(model, patched_logits).detach()
            ioi_patching_result[layer, position] = (patched_logit_diff - corrupted_logit_diff) / (
                clean_logit_diff - corrupted_logit_diff
            )
    # At layer 0 the residual at a position is its token's embedding: patching the one differing
    # position recovers the clean run (1), any other position changes nothing (0).
    expected = torch.zeros(num_positions)
    expected[differs[0]] = 1
    torch.testing.assert_close(ioi_patching_result[0, positions], expected[positions], atol=1e-4, rtol=0)


def test_main_demo_hooks_and_induction_heads(embedded_model):
    """Cells: repeated random tokens (seq 50, randint(1000, 10000)); loss_fn(per_token) and loss
    by position; induction_score_hook over every pattern with a callable filter; a
    run_with_hooks that only reads activations (return_type=None) (4 cells). Batch 4 instead of
    the demo's 10, for time on this machine."""
    model = embedded_model
    batch_size, seq_len = 4, 50
    size = (batch_size, seq_len)
    input_tensor = torch.randint(1000, 10000, size, generator=torch.Generator().manual_seed(0))
    random_tokens = input_tensor.to(model.cfg.device)
    repeated_tokens = einops.repeat(random_tokens, "batch seq_len -> batch (2 seq_len)")
    repeated_logits = model(repeated_tokens)
    correct_log_probs = model.loss_fn(repeated_logits, repeated_tokens, per_token=True)
    loss_by_position = einops.reduce(correct_log_probs, "batch position -> position", "mean")
    # Random tokens cannot be predicted the first time; the repeat can (induction).
    assert loss_by_position[seq_len:].mean() < loss_by_position[: seq_len - 1].mean() / 2

    induction_score_store = torch.zeros((model.cfg.n_layers, model.cfg.n_heads), device=model.cfg.device)

    def induction_score_hook(pattern, hook):
        induction_stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len)
        induction_score = einops.reduce(induction_stripe, "batch index pos -> index", "mean")
        induction_score_store[hook.layer(), :] = induction_score

    pattern_hook_names_filter = lambda name: name.endswith("pattern")  # noqa: E731
    model.run_with_hooks(
        repeated_tokens, return_type=None, fwd_hooks=[(pattern_hook_names_filter, induction_score_hook)]
    )
    assert (induction_score_store > 0).all()
    assert induction_score_store.max() > 0.4  # a trained model has induction heads


def test_main_demo_factored_matrix_and_circuits(embedded_model):
    """Cells: A @ B vs FactoredMatrix(A, B) norms and dims; eigenvalues; @ C and get_corner;
    svd; model.OV eigenvalue copying scores; the full OV circuit's corner (5 cells)."""
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 2, generator=g), torch.randn(2, 5, generator=g)
    AB = A @ B
    AB_factor = FactoredMatrix(A, B)
    torch.testing.assert_close(AB_factor.norm(), AB.norm())
    assert (AB_factor.rdim, AB_factor.ldim, AB_factor.mdim) == (5, 5, 2)
    eig = torch.linalg.eig(AB).eigenvalues
    top = eig[eig.abs().argsort(descending=True)][:2]
    factor_eig = AB_factor.eigenvalues
    torch.testing.assert_close(sorted(factor_eig.abs().tolist()), sorted(top.abs().tolist()), atol=1e-4, rtol=1e-4)
    C = torch.randn(5, 300, generator=g)
    ABC = AB @ C
    ABC_factor = AB_factor @ C
    torch.testing.assert_close(utils.get_corner(ABC_factor), utils.get_corner(ABC), atol=1e-5, rtol=1e-5)
    U, S, Vh = AB_factor.svd()
    torch.testing.assert_close((U * S) @ Vh.T, AB, atol=1e-4, rtol=1e-4)

    model = embedded_model
    OV_circuit_all_heads = model.OV
    assert OV_circuit_all_heads.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_model)
    eigenvalues = OV_circuit_all_heads[:2].eigenvalues
    OV_copying_score = eigenvalues.sum(dim=-1).real / eigenvalues.abs().sum(dim=-1)
    assert ((OV_copying_score >= -1 - 1e-4) & (OV_copying_score <= 1 + 1e-4)).all()
    full_OV_circuit = model.embed.W_E @ OV_circuit_all_heads[0, 0] @ model.unembed.W_U
    corner = utils.get_corner(full_OV_circuit, 3)
    expected = model.embed.W_E[:3] @ model.OV[0, 0].AB @ model.unembed.W_U[:, :3]
    torch.testing.assert_close(corner, expected, atol=1e-3, rtol=1e-3)


def test_main_demo_tokens_generation_and_folding(embedded_model, hf_checkpoint):
    """Cells: to_str_tokens with and without BOS; to_single_token and to_string; get_token_position;
    generate with temperature; from_pretrained vs from_pretrained_no_processing log-probs (folding);
    refactor_factored_attn_matrices, refused on a rotary model (6 cells, 5 match)."""
    model = embedded_model
    with_bos = model.to_str_tokens("Hello world", prepend_bos=True)
    without = model.to_str_tokens("Hello world", prepend_bos=False)
    assert with_bos[1:] == without
    token = model.to_single_token(" Ralph")
    assert model.to_string([token]) == " Ralph"
    bos = int(model.cfg.default_prepend_bos)  # the GGUF's metadata says whether prompts start with BOS
    assert model.get_token_position(" cat", "The cat sat on the mat, the cat") == 1 + bos
    last = model.get_token_position(" cat", "The cat sat on the mat, the cat", mode="last")
    assert last == model.to_tokens("The cat sat on the mat, the cat").shape[1] - 1
    torch.manual_seed(0)
    text = model.generate("The capital of France is", max_new_tokens=5, temperature=0.7, verbose=False)
    assert text.startswith("The capital of France is")

    path, _ = hf_checkpoint("gpt2")
    folded = HookedTransformer.from_pretrained(str(path))
    unfolded = HookedTransformer.from_pretrained_no_processing(str(path))
    tokens = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(folded(tokens).log_softmax(-1), unfolded(tokens).log_softmax(-1), atol=1e-4, rtol=0)

    rotary_path, _ = hf_checkpoint("llama-gqa")
    with pytest.raises((ValueError, NotImplementedError), match=r"refactor_factored_attn_matrices.*rotary"):
        HookedTransformer.from_pretrained(str(rotary_path), refactor_factored_attn_matrices=True)


def test_main_demo_config_built_model_trains_like_tl():
    """Cells: HookedTransformerConfig(n_layers=2, d_model=..., attn_only, ...) and
    HookedTransformer(cfg); a few optimiser steps lower the loss (2 cells)."""
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=20,
        n_ctx=16,
        act_fn="relu",
        normalization_type="LN",
        seed=0,
    )
    model = HookedTransformer(cfg)
    # TL's init: W_* ~ N(0, (0.8 / sqrt(d_model))^2), biases 0, LN weights 1.
    assert abs(model.W_Q.std().item() - 0.8 / 32**0.5) < 0.02
    assert model.b_in.abs().sum() == 0 and torch.equal(model.blocks[0].ln1.w, torch.ones(32))
    tokens = torch.randint(0, 20, (8, 16), generator=torch.Generator().manual_seed(0)).repeat(1, 1)
    tokens[:, 8:] = tokens[:, :8]  # learnable: a repeat
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(tokens, return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# Exploratory Analysis Demo -----------------------------------------------------------------------
PROMPT_FORMAT = [
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sid went to the shops,{} gave an apple to",
    "After Martin and Amy went to the park,{} gave a drink to",
]
NAME_PAIRS = [(" John", " Mary"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy")]


def ioi_batch(model):
    prompts, answers = [], []
    for i in range(len(PROMPT_FORMAT)):
        for j in range(2):
            answers.append((NAME_PAIRS[i][j], NAME_PAIRS[i][1 - j]))
            prompts.append(PROMPT_FORMAT[i].format(NAME_PAIRS[i][1 - j]))
    answer_tokens = torch.tensor(
        [[model.to_single_token(answers[i][j]) for j in range(2)] for i in range(len(answers))]
    )
    return prompts, answers, answer_tokens


def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
    final_logits = logits[:, -1, :]
    answer_logits = final_logits.gather(dim=-1, index=answer_tokens)
    answer_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]
    return answer_logit_diff if per_prompt else answer_logit_diff.mean()


@pytest.fixture(scope="module")
def ioi(embedded_model):
    model = embedded_model
    prompts, answers, answer_tokens = ioi_batch(model)
    tokens = model.to_tokens(prompts, prepend_bos=True)
    original_logits, cache = model.run_with_cache(tokens)
    corrupted_prompts = [prompts[i + 1] if i % 2 == 0 else prompts[i - 1] for i in range(len(prompts))]
    corrupted_tokens = model.to_tokens(corrupted_prompts, prepend_bos=True)
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens, return_type="logits")
    return dict(
        prompts=prompts,
        answer_tokens=answer_tokens,
        tokens=tokens,
        original_logits=original_logits,
        cache=cache,
        corrupted_tokens=corrupted_tokens,
        corrupted_logits=corrupted_logits,
        corrupted_cache=corrupted_cache,
    )


def test_exploratory_analysis_logit_diff_and_direct_logit_attribution(embedded_model, ioi):
    """Cells: prompts and answer tokens; to_tokens(prepend_bos=True); run_with_cache;
    logits_to_ave_logit_diff; tokens_to_residual_directions and logit-diff directions; the final
    residual through apply_ln_to_stack(layer=-1, pos_slice=-1) gives the logit difference;
    residual_stack_to_logit_diff; accumulated_resid(incl_mid) logit lens; decompose_resid by
    layer; stack_head_results by head; top heads and their patterns (11 cells)."""
    model, cache, answer_tokens = embedded_model, ioi["cache"], ioi["answer_tokens"]
    prompts = ioi["prompts"]
    assert ioi["tokens"].shape[0] == 8 and (ioi["tokens"] != model.tokenizer.pad_token_id).all()
    original_average_logit_diff = logits_to_ave_logit_diff(ioi["original_logits"], answer_tokens)
    per_prompt = logits_to_ave_logit_diff(ioi["original_logits"], answer_tokens, per_prompt=True)
    assert per_prompt.shape == (8,) and original_average_logit_diff > 0  # the model does IOI

    answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)
    logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]
    final_residual_stream = cache["resid_post", -1]
    final_token_residual_stream = final_residual_stream[:, -1, :]
    scaled_final_token_residual_stream = cache.apply_ln_to_stack(final_token_residual_stream, layer=-1, pos_slice=-1)
    average_logit_diff = einops.einsum(
        scaled_final_token_residual_stream, logit_diff_directions, "batch d_model, batch d_model ->"
    ) / len(prompts)
    torch.testing.assert_close(average_logit_diff, original_average_logit_diff, atol=1e-3, rtol=1e-4)

    def residual_stack_to_logit_diff(residual_stack, cache):
        scaled_residual_stack = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
        return einops.einsum(
            scaled_residual_stack, logit_diff_directions, "... batch d_model, batch d_model -> ..."
        ) / len(prompts)

    accumulated_residual, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    logit_lens_logit_diffs = residual_stack_to_logit_diff(accumulated_residual, cache)
    assert labels[-1] == "final_post" and len(labels) == 2 * model.cfg.n_layers + 1
    torch.testing.assert_close(logit_lens_logit_diffs[-1], original_average_logit_diff, atol=1e-3, rtol=1e-4)

    per_layer_residual, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    per_layer_logit_diffs = residual_stack_to_logit_diff(per_layer_residual, cache)
    torch.testing.assert_close(per_layer_logit_diffs.sum(), original_average_logit_diff, atol=1e-3, rtol=1e-4)

    per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    per_head_logit_diffs = residual_stack_to_logit_diff(per_head_residual, cache)
    per_head_logit_diffs = einops.rearrange(
        per_head_logit_diffs, "(layer head_index) -> layer head_index", layer=model.cfg.n_layers
    )
    attn_out_logit_diffs = per_layer_logit_diffs[1::2]  # embed, then attn_out / mlp_out per layer
    assert labels[0] == "L0H0"
    b_O = residual_stack_to_logit_diff(model.b_O[:, None, :].expand(-1, 8, -1), cache)
    torch.testing.assert_close(per_head_logit_diffs.sum(-1) + b_O, attn_out_logit_diffs, atol=1e-3, rtol=1e-4)

    top_k = 3
    top_positive_logit_attr_heads = torch.topk(per_head_logit_diffs.flatten(), k=top_k).indices
    for index in top_positive_logit_attr_heads.tolist():
        layer, head_index = divmod(index, model.cfg.n_heads)
        pattern = cache["attn", layer][0, head_index]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[0]))


def patch_residual_component(corrupted_residual_component, hook, pos, clean_cache):
    corrupted_residual_component[:, pos, :] = clean_cache[hook.name][:, pos, :]
    return corrupted_residual_component


def patch_head_vector(corrupted_head_vector, hook, head_index, clean_cache):
    corrupted_head_vector[:, :, head_index, :] = clean_cache[hook.name][:, :, head_index, :]
    return corrupted_head_vector


def test_exploratory_analysis_activation_patching(embedded_model, ioi):
    """Cells: corrupted prompts and their run_with_cache; normalize_patched_logit_diff; patch the
    residual stream by layer and position; patch attn_out by layer (the same via every head's z); patch each head's
    z (5 cells). Layer 0 is swept, and 3 heads (all 30 layers would take minutes on this machine)."""
    model, cache = embedded_model, ioi["cache"]
    answer_tokens, tokens, corrupted_tokens = ioi["answer_tokens"], ioi["tokens"], ioi["corrupted_tokens"]
    original_average_logit_diff = logits_to_ave_logit_diff(ioi["original_logits"], answer_tokens)
    corrupted_average_logit_diff = logits_to_ave_logit_diff(ioi["corrupted_logits"], answer_tokens)
    assert corrupted_average_logit_diff < 0 < original_average_logit_diff

    def normalize_patched_logit_diff(patched_logit_diff):
        return (patched_logit_diff - corrupted_average_logit_diff) / (
            original_average_logit_diff - corrupted_average_logit_diff
        )

    layers = [0]
    differs = (tokens != corrupted_tokens).any(0).nonzero().flatten().tolist()
    assert len(differs) == 1  # only the second mention of the subject differs
    # The demo sweeps every position; for time, the differing one, its neighbours and the ends.
    positions = sorted({0, differs[0] - 1, differs[0], differs[0] + 1, tokens.shape[1] - 1})
    patched_residual_stream_diff = torch.zeros(model.cfg.n_layers, tokens.shape[1], device=model.cfg.device)
    for layer in layers:
        for position in positions:
            hook_fn = partial(patch_residual_component, pos=position, clean_cache=cache)
            patched_logits = model.run_with_hooks(
                corrupted_tokens, fwd_hooks=[(utils.get_act_name("resid_pre", layer), hook_fn)], return_type="logits"
            )
            patched_logit_diff = logits_to_ave_logit_diff(patched_logits, answer_tokens)
            patched_residual_stream_diff[layer, position] = normalize_patched_logit_diff(patched_logit_diff)
    expected = torch.zeros(tokens.shape[1])
    expected[differs] = 1
    torch.testing.assert_close(patched_residual_stream_diff[0, positions], expected[positions], atol=1e-4, rtol=0)

    # Patching every head's z at a layer is patching that layer's attention output.
    layer = model.cfg.n_layers - 1
    whole = torch.zeros(())
    for position in [tokens.shape[1] - 1]:
        hook_fn = partial(patch_residual_component, pos=position, clean_cache=cache)
        via_attn_out = model.run_with_hooks(
            corrupted_tokens, fwd_hooks=[(utils.get_act_name("attn_out", layer), hook_fn)], return_type="logits"
        )
        via_z = model.run_with_hooks(
            corrupted_tokens, fwd_hooks=[(utils.get_act_name("z", layer, "attn"), hook_fn)], return_type="logits"
        )
        torch.testing.assert_close(via_attn_out, via_z, atol=1e-4, rtol=1e-4)
        whole = whole + normalize_patched_logit_diff(logits_to_ave_logit_diff(via_z, answer_tokens))
    assert torch.isfinite(whole)

    patched_head_z_diff = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, device=model.cfg.device)
    for head_index in range(3):  # of 9, for time
        hook_fn = partial(patch_head_vector, head_index=head_index, clean_cache=cache)
        patched_logits = model.run_with_hooks(
            corrupted_tokens, fwd_hooks=[(utils.get_act_name("z", 0, "attn"), hook_fn)], return_type="logits"
        )
        patched_head_z_diff[0, head_index] = normalize_patched_logit_diff(
            logits_to_ave_logit_diff(patched_logits, answer_tokens)
        )
    assert torch.isfinite(patched_head_z_diff).all()


# Activation Patching in TransformerLens Demo ----------------------------------------------------
def test_activation_patching_demo_ioi(hf_checkpoint):
    """Cells: CLEAN/CORRUPTED logit diffs and ioi_metric (1 on clean, 0 on corrupt);
    get_act_patch_resid_pre; get_act_patch_attn_head_out_all_pos; get_act_patch_block_every
    (4 cells). The sweeps patch every layer x position (x head): on the 30-layer embedded model
    that is thousands of runs, so they run on a small random GPT-2 with IOI-shaped tokens (two
    names, one swapped in the corrupted batch)."""
    path, _ = hf_checkpoint("gpt2")
    model = HookedTransformer.from_pretrained(str(path))
    g = torch.Generator().manual_seed(0)
    clean_tokens = torch.randint(3, 90, (4, 8), generator=g)
    answer_tokens = clean_tokens[:, :2].clone()  # the two "names"
    corrupted_tokens = clean_tokens.clone()
    corrupted_tokens[:, 5] = torch.where(
        clean_tokens[:, 5] == answer_tokens[:, 0], answer_tokens[:, 1], answer_tokens[:, 0]
    )
    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_logits = model(corrupted_tokens)
    CLEAN_BASELINE = logits_to_ave_logit_diff(clean_logits, answer_tokens).item()
    CORRUPTED_BASELINE = logits_to_ave_logit_diff(corrupted_logits, answer_tokens).item()

    def ioi_metric(logits, answer_tokens=answer_tokens):
        return (logits_to_ave_logit_diff(logits, answer_tokens) - CORRUPTED_BASELINE) / (
            CLEAN_BASELINE - CORRUPTED_BASELINE
        )

    assert abs(ioi_metric(clean_logits).item() - 1) < 1e-5
    assert abs(ioi_metric(corrupted_logits).item()) < 1e-5

    resid_pre_act_patch_results = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, ioi_metric)
    n_pos = corrupted_tokens.shape[1]
    assert resid_pre_act_patch_results.shape == (model.cfg.n_layers, n_pos)
    expected = torch.zeros(n_pos)
    expected[5] = 1
    # Layer 0 carries only each position's own token (and position): the swapped one is everything.
    torch.testing.assert_close(resid_pre_act_patch_results[0], expected, atol=1e-4, rtol=0)

    attn_head_out_all_pos_act_patch_results = patching.get_act_patch_attn_head_out_all_pos(
        model, corrupted_tokens, clean_cache, ioi_metric
    )
    assert attn_head_out_all_pos_act_patch_results.shape == (model.cfg.n_layers, model.cfg.n_heads)

    every_block_result = patching.get_act_patch_block_every(model, corrupted_tokens, clean_cache, ioi_metric)
    assert every_block_result.shape == (3, model.cfg.n_layers, n_pos)
    torch.testing.assert_close(every_block_result[0], resid_pre_act_patch_results, atol=1e-4, rtol=1e-4)
    # Patching the whole last position's stream after the last block... is the attention output
    # and MLP output of that block on top of its clean input: together they give the clean run.
    last = model.run_with_hooks(
        corrupted_tokens,
        fwd_hooks=[
            (
                utils.get_act_name("resid_post", model.cfg.n_layers - 1),
                partial(patch_residual_component, pos=n_pos - 1, clean_cache=clean_cache),
            )
        ],
    )
    assert abs(ioi_metric(last).item() - 1) < 1e-4


@pytest.fixture(scope="module")
def attn_only_checkpoint(tmp_path_factory):
    """A TransformerLens-native attention-only checkpoint (config.json in its keys + a .pth state
    dict), as its toy models ship, built from a random two-layer model."""
    from weights_conversion.transformer_lens import to_transformer_lens_state_dict

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=64,
        d_head=16,
        n_heads=4,
        d_mlp=None,
        d_vocab=100,
        n_ctx=64,
        act_fn=None,
        attn_only=True,
        normalization_type="LN",
        positional_embedding_type="standard",
        seed=1,
    )
    model = HookedTransformer(cfg)
    directory = tmp_path_factory.mktemp("attn-only-2l")
    torch.save(to_transformer_lens_state_dict(model), directory / "attn_only_2l_final.pth")
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "device", "n_params")}
    (directory / "config.json").write_text(json.dumps({**saved, "lr": 1e-3, "batch_size": 8}))
    return directory, model


def test_activation_patching_demo_attn_only_induction(attn_only_checkpoint):
    """Cells: load attn-only-2l (here a local TransformerLens checkpoint); repeated random tokens
    and a corrupted copy; induction metric; get_act_patch_resid_pre;
    get_act_patch_attn_head_all_pos_every; get_act_patch_attn_head_by_pos_every (6 cells)."""
    directory, original = attn_only_checkpoint
    attn_only = HookedTransformer.from_pretrained(str(directory))
    assert attn_only.cfg.attn_only and attn_only.cfg.n_layers == 2
    raw = HookedTransformer.from_pretrained_no_processing(str(directory))
    g = torch.Generator().manual_seed(0)
    seq_len = 10
    random_tokens = torch.randint(0, 100, (4, seq_len), generator=g)
    clean_tokens = torch.cat([random_tokens, random_tokens], dim=1)
    assert torch.equal(raw(clean_tokens), original(clean_tokens))
    torch.testing.assert_close(
        attn_only(clean_tokens).log_softmax(-1), original(clean_tokens).log_softmax(-1), atol=1e-4, rtol=0
    )

    corrupted_tokens = clean_tokens.clone()
    corrupted_tokens[:, seq_len] = (corrupted_tokens[:, seq_len] + 1) % 100  # one token of the repeat
    clean_logits, clean_cache = attn_only.run_with_cache(clean_tokens)
    corrupted_logits = attn_only(corrupted_tokens)
    answer = clean_tokens[:, -1]

    def induction_loss_of(logits):
        return -logits[:, -2].log_softmax(-1).gather(-1, answer[:, None]).mean()

    CLEAN, CORRUPT = induction_loss_of(clean_logits).item(), induction_loss_of(corrupted_logits).item()

    def induction_metric(logits):
        return (induction_loss_of(logits) - CORRUPT) / (CLEAN - CORRUPT)

    resid = patching.get_act_patch_resid_pre(attn_only, corrupted_tokens, clean_cache, induction_metric)
    expected = torch.zeros(2 * seq_len)
    expected[seq_len] = 1
    torch.testing.assert_close(resid[0], expected, atol=1e-4, rtol=0)
    every = patching.get_act_patch_attn_head_all_pos_every(attn_only, corrupted_tokens, clean_cache, induction_metric)
    assert every.shape == (5, 2, 4) and torch.isfinite(every).all()
    by_pos = patching.get_act_patch_attn_head_by_pos_every(attn_only, corrupted_tokens, clean_cache, induction_metric)
    assert by_pos.shape == (5, 2, 2 * seq_len, 4)
    # An attention-only model caches no MLP sites and its residual decomposes into embeddings and heads.
    assert not any("mlp" in name or "resid_mid" in name for name in clean_cache)
    parts = clean_cache.decompose_resid(layer=-1)
    torch.testing.assert_close(parts.sum(0), clean_cache["resid_post", 1], atol=1e-4, rtol=1e-4)


# Attribution Patching Demo ----------------------------------------------------------------------
def test_attribution_patching_demo(embedded_model, ioi):
    """Cells: filter_not_qkv_input; get_cache_fwd_and_bwd with add_hook(fwd/bwd) and
    reset_hooks; clean value 1 and corrupted value 0; attr_patch_residual over accumulated_resid;
    attr_patch_layer_out over decompose_resid; attr_patch_head_out over stack_head_results;
    compare with activation patching of resid_pre at layer 0 (9 cells)."""
    model, answer_tokens = embedded_model, ioi["answer_tokens"]
    clean_tokens, corrupted_tokens = ioi["tokens"], ioi["corrupted_tokens"]
    CLEAN_BASELINE = logits_to_ave_logit_diff(ioi["original_logits"], answer_tokens).item()
    CORRUPTED_BASELINE = logits_to_ave_logit_diff(ioi["corrupted_logits"], answer_tokens).item()

    def ioi_metric(logits, answer_tokens=answer_tokens):
        return (logits_to_ave_logit_diff(logits, answer_tokens) - CORRUPTED_BASELINE) / (
            CLEAN_BASELINE - CORRUPTED_BASELINE
        )

    filter_not_qkv_input = lambda name: "_input" not in name  # noqa: E731

    def get_cache_fwd_and_bwd(model, tokens, metric):
        model.reset_hooks()
        cache = {}

        def forward_cache_hook(act, hook):
            cache[hook.name] = act.detach()

        model.add_hook(filter_not_qkv_input, forward_cache_hook, "fwd")
        grad_cache = {}

        def backward_cache_hook(act, hook):
            grad_cache[hook.name] = act.detach()

        model.add_hook(filter_not_qkv_input, backward_cache_hook, "bwd")
        value = metric(model(tokens))
        value.backward()
        model.reset_hooks()
        return value.item(), ActivationCache(cache, model), ActivationCache(grad_cache, model)

    try:
        clean_value, clean_cache, clean_grad_cache = get_cache_fwd_and_bwd(model, clean_tokens, ioi_metric)
        corrupted_value, corrupted_cache, corrupted_grad_cache = get_cache_fwd_and_bwd(
            model, corrupted_tokens, ioi_metric
        )
    finally:
        model.reset_hooks()
        model.zero_grad(set_to_none=True)
    assert abs(clean_value - 1) < 1e-4 and abs(corrupted_value) < 1e-4

    def attr_patch_residual(clean_cache, corrupted_cache, corrupted_grad_cache):
        clean_residual, residual_labels = clean_cache.accumulated_resid(-1, incl_mid=True, return_labels=True)
        corrupted_residual = corrupted_cache.accumulated_resid(-1, incl_mid=True, return_labels=False)
        corrupted_grad_residual = corrupted_grad_cache.accumulated_resid(-1, incl_mid=True, return_labels=False)
        residual_attr = einops.reduce(
            corrupted_grad_residual * (clean_residual - corrupted_residual),
            "component batch pos d_model -> component pos",
            "sum",
        )
        return residual_attr, residual_labels

    residual_attr, residual_labels = attr_patch_residual(clean_cache, corrupted_cache, corrupted_grad_cache)
    assert residual_attr.shape == (2 * model.cfg.n_layers + 1, clean_tokens.shape[1])
    differs = (clean_tokens != corrupted_tokens).any(0)
    # Where the clean and corrupted residuals are the same (layer 0, unchanged tokens) nothing is attributed.
    assert residual_attr[0, ~differs].abs().max() == 0 and residual_attr[0, differs].abs().max() > 0

    def attr_patch_layer_out(clean_cache, corrupted_cache, corrupted_grad_cache):
        clean_layer_out, labels = clean_cache.decompose_resid(-1, return_labels=True)
        corrupted_layer_out = corrupted_cache.decompose_resid(-1, return_labels=False)
        corrupted_grad_layer_out = corrupted_grad_cache.decompose_resid(-1, return_labels=False)
        layer_out_attr = einops.reduce(
            corrupted_grad_layer_out * (clean_layer_out - corrupted_layer_out),
            "component batch pos d_model -> component pos",
            "sum",
        )
        return layer_out_attr, labels

    layer_out_attr, layer_out_labels = attr_patch_layer_out(clean_cache, corrupted_cache, corrupted_grad_cache)
    assert layer_out_labels[0] == "embed" and layer_out_attr.shape[0] == 1 + 2 * model.cfg.n_layers
    # The embedding's attribution is the layer-0 residual's (they are the same tensor).
    torch.testing.assert_close(layer_out_attr[0], residual_attr[0], atol=1e-6, rtol=1e-5)

    def attr_patch_head_out(clean_cache, corrupted_cache, corrupted_grad_cache):
        labels = [f"L{layer}H{h}" for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
        clean_head_out = clean_cache.stack_head_results(-1, return_labels=False)
        corrupted_head_out = corrupted_cache.stack_head_results(-1, return_labels=False)
        corrupted_grad_head_out = corrupted_grad_cache.stack_activation("attn_out")
        corrupted_grad_head_out = corrupted_grad_head_out.repeat_interleave(model.cfg.n_heads, dim=0)
        head_out_attr = einops.reduce(
            corrupted_grad_head_out * (clean_head_out - corrupted_head_out),
            "component batch pos d_model -> component pos",
            "sum",
        )
        return head_out_attr, labels

    head_out_attr, head_out_labels = attr_patch_head_out(clean_cache, corrupted_cache, corrupted_grad_cache)
    assert len(head_out_labels) == head_out_attr.shape[0]
    # A layer's heads' attributions sum to its attention output's (the same gradient, b_O cancels).
    per_layer = head_out_attr.reshape(model.cfg.n_layers, model.cfg.n_heads, -1).sum(1)
    torch.testing.assert_close(per_layer, layer_out_attr[1::2], atol=1e-4, rtol=1e-3)
