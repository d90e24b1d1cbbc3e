"""A feature's top-activating contexts page, rendered by headless Chromium: the DOM the
browser builds lists every context (its tokens' text and its activation) strongest first
with the strongest token outlined, tokens such as ``<b>`` or a newline show as text, and
the screenshot is not blank. Needs headless Chromium: skipped without it (``bash
scripts/setup.sh --browser`` installs it), except under CI, which must run it."""

import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from transformer_hooks import HookedTransformer
from transformer_hooks.activations import harvest
from transformer_hooks.sae import SAE, FeatureContext, feature_contexts_html, top_activations

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    message = (
        "headless Chromium is not installed: run `bash scripts/setup.sh --browser` (Debian's chromium, "
        "with apt-get as root) or put chromium on PATH to run this test"
    )
    if os.environ.get("CI"):  # CI runs everything: a missing browser is a broken setup there
        pytest.fail(message)
    pytest.skip(message)


def run_chromium(page: Path, tmp_path: Path, *args: str) -> str:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"chromium failed ({out.returncode}): {out.stderr[-2000:]}"
    return out.stdout


class RenderedContexts(HTMLParser):
    """Each <li class="context">: its activation shown, the text of its tokens, which is outlined,
    and every element inside a token (there must be none but the grey escapes' spans)."""

    def __init__(self):
        super().__init__()
        self.items: list[dict] = []
        self.field: str | None = None
        self.depth = 0  # open spans inside the current .act / .tok span

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if self.field is not None:
            self.depth += 1
            if self.field == "tok":
                self.items[-1]["inner"].append((tag, a.get("class")))
        elif tag == "li" and "context" in cls:
            self.items.append({"act": "", "tokens": [], "top": [], "inner": [], "data": float(a["data-activation"])})
        elif tag == "span" and "act" in cls:
            self.field = "act"
        elif tag == "span" and "tok" in cls:
            self.items[-1]["tokens"].append("")
            self.items[-1]["top"].append("top" in cls)
            self.field = "tok"

    def handle_endtag(self, tag):
        if self.field is not None:
            if self.depth:
                self.depth -= 1
            else:
                self.field = None

    def handle_data(self, data):
        if self.field == "act":
            self.items[-1]["act"] += data
        elif self.field == "tok":
            self.items[-1]["tokens"][-1] += data


def rendered(page: Path, tmp_path: Path) -> list[dict]:
    dom = run_chromium(page, tmp_path, "--dump-dom")
    assert "<ol" in dom, f"chromium returned no page: {dom[:500]!r}"
    p = RenderedContexts()
    p.feed(dom)
    return p.items


def assert_not_blank(png: Path):
    assert png.exists() and png.stat().st_size > 1000, f"no screenshot at {png}"
    from PIL import Image

    img = Image.open(io.BytesIO(png.read_bytes())).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 10, f"the screenshot is blank ({len(colours)} colours)"
    # not only text: the shaded tokens put orange pixels on the page
    assert any(r > 200 and 80 < g < 230 and b < 150 for _, (r, g, b) in colours), "no token is shaded"


def test_feature_page_renders_every_context_in_chromium(hf_checkpoint, tmp_path):
    from checkpoints import VOCAB
    from tokenizers_util import SENTENCES, tiny_tokenizer

    model = HookedTransformer.from_pretrained_no_processing(str(hf_checkpoint("llama-gqa")[0]))
    tokenizer = tiny_tokenizer(VOCAB)
    model.set_tokenizer(tokenizer)
    site = "blocks.0.hook_resid_post"
    ds = harvest(
        model, SENTENCES * 3 + ["Rome & <Madrid>"], site, tmp_path / "h", context_size=8, batch_size=4,
        shard_tokens=32, progress=False,
    )  # fmt: skip
    sae = SAE.for_model(model, site, d_sae=16, seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
        values = sae.encode(ds.rows(range(len(ds)), site))
    feature = int((values > 0).sum(0).argmax())
    contexts = top_activations(ds, sae, feature, top=6)
    assert len(contexts) >= 3
    page = tmp_path / "feature.html"
    feature_contexts_html(contexts, tokenizer, title=f"feature {feature}", path=page)

    items = rendered(page, tmp_path)
    assert len(items) == len(contexts)
    for item, c in zip(items, contexts, strict=True):  # in order, strongest first
        assert item["data"] == pytest.approx(c.activation, rel=1e-5)
        assert float(item["act"]) == pytest.approx(c.activation, abs=5e-4)
        assert item["tokens"] == [tokenizer.decode([t]) for t in c.tokens]
        assert item["top"] == [i == c.position for i in range(len(c.tokens))]
    shown = [float(i["act"]) for i in items]
    assert shown == sorted(shown, reverse=True)

    png = tmp_path / "feature.png"
    run_chromium(page, tmp_path, f"--screenshot={png}", "--window-size=1000,600")
    assert_not_blank(png)


def test_tokens_that_look_like_html_or_whitespace_show_as_text(tmp_path):
    """A ``<b>`` or ``</li>`` token is text, not markup; newlines, tabs and control characters
    show as grey escapes; spaces are kept; an empty token is a visible box."""
    pieces = ["<s>", " <b>", "bold", "</b>", "\n", "\t", "  x", "&amp;", "\r\n", "", "\x00", "</li>", "\"q'"]
    shown = ["<s>", " <b>", "bold", "</b>", "\\n", "\\t", "  x", "&amp;", "\\r\\n", "∅", "\\x00", "</li>", "\"q'"]

    class Tokenizer:
        def decode(self, ids):
            return "".join(pieces[i] for i in ids)

    ids = list(range(len(pieces)))
    contexts = [
        FeatureContext(row=0, context=0, position=1, activation=2.0, tokens=ids, activations=[0.5, 2.0] + [1.0] * 11),
        FeatureContext(
            row=5, context=1, position=4, activation=1.0, tokens=ids, activations=[0.0] * 4 + [1.0] + [0.2] * 8
        ),
    ]
    page = tmp_path / "tricky.html"
    feature_contexts_html(contexts, Tokenizer(), title="feature <script>alert(1)</script>", path=page)
    items = rendered(page, tmp_path)
    assert [i["data"] for i in items] == [2.0, 1.0]
    for item, c in zip(items, contexts, strict=True):
        assert item["tokens"] == shown
        assert item["top"] == [i == c.position for i in range(len(pieces))]
        assert {tag for tag, _ in item["inner"]} <= {"span"} and {cls for _, cls in item["inner"]} == {"ws"}
    dom = run_chromium(page, tmp_path, "--dump-dom")
    assert "<script>alert" not in dom and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
