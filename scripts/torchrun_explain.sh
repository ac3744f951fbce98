#!/usr/bin/env bash
# Explain a dataset with DDP under torchrun, on one node or several.
#   one node, 8 GPUs:   scripts/torchrun_explain.sh configs/multi_gpu.yaml
#   node k of N:        NNODES=N NODE_RANK=k MASTER_ADDR=host0 scripts/torchrun_explain.sh configs/multi_gpu.yaml
# Extra arguments go to `neuromask-pl predict` (e.g. --data.init_args.root /data/val).
# Rerun the same command after a preemption: finished samples are kept and skipped.
set -euo pipefail
config="${1:?usage: torchrun_explain.sh CONFIG [neuromask-pl options]}"; shift
nproc="${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
nproc="${nproc:-1}"; [ "$nproc" -ge 1 ] || nproc=1
exec torchrun \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$nproc" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m neuromask_pl.cli predict --config "$config" \
  --trainer.devices "$nproc" --trainer.num_nodes "${NNODES:-1}" "$@"
