#!/usr/bin/env bash
# One node, one process per GPU: torchrun (standalone rendezvous) around llm_pretrain.train.
# Every argument is a Hydra override of the training job.
#
#   launch/torchrun.sh experiment=galore_c4 model=llama_130m
#   NPROC=4 launch/torchrun.sh experiment=apollo_c4 model=llama_350m
#
# NPROC: processes (default: the GPUs nvidia-smi lists, else 1). PYTHON: the interpreter with
# llm_pretrain installed (default: python). On a CPU-only machine the ranks use gloo.
set -euo pipefail

if [[ -z "${NPROC:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        NPROC=$(nvidia-smi -L | wc -l)
    else
        NPROC=1
    fi
fi

exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node="${NPROC}" \
    -m llm_pretrain.train "$@"
