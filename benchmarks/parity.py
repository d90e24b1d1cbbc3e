"""Worst parity error against HF transformers, per family, over the test configs
(tests/checkpoints.py): max |ours - HF| over the logits and every layer's residual stream,
float32, HF's eager and SDPA attention (where HF has SDPA), 4 x 64 random tokens.
Prints the rows of README's model table. Run: python benchmarks/parity.py
"""

from __future__ import annotations

import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from checkpoints import CONFIGS, FAMILY_CONFIGS, VOCAB, save_checkpoint  # noqa: E402

from transformer_hooks import HookedTransformer  # noqa: E402
from transformer_hooks.parity import parity_errors  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    worst: dict[str, float] = defaultdict(float)
    tokens = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as directory:
        for name in [*CONFIGS, *FAMILY_CONFIGS]:
            path, _ = save_checkpoint(name, Path(directory))
            model = HookedTransformer.from_pretrained_no_processing(str(path))
            for impl in ("eager", "sdpa"):
                try:
                    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()
                except ValueError:  # HF has no SDPA for this family (GPT-Neo, Gemma 2)
                    continue
                error = max(row.max_abs_error for row in parity_errors(model, hf, tokens))
                family = model.cfg.original_architecture
                worst[family] = max(worst[family], error)
                print(f"{name:28s} {impl:6s} {error:.1e}", flush=True)
    print()
    for family, error in worst.items():
        print(f"{family:28s} {error:.1e}")


if __name__ == "__main__":
    main()
