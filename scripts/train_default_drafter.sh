#!/usr/bin/env bash
# The recipe behind the packaged default drafter and the recipe comparison (issue 4), as run on the
# lent GPU (see README). Usage: scripts/train_default_drafter.sh PHASE DATA_DIR WORK_DIR
#   PHASE data    : distillation data (base model's greedy responses) + dataset-reply data
#   PHASE train   : the variants (shared / reduced / full heads; CE, CE+KL, ground truth)
#   PHASE eval    : acceptance of every variant at W x Lb = 4 x 5 on MT-Bench's 80 first turns
set -euo pipefail
phase=$1 data=$2 work=$3
N=${N:-6000} EPOCHS=${EPOCHS:-2} TOKENS=${TOKENS:-256}
run() { python3 -m mlx_redrafter "$@"; }
common=(--prompts "$data/sharegpt.jsonl.gz" --num-prompts "$N" --max-new-tokens "$TOKENS" --epochs "$EPOCHS" --gen-batch-size 64)
case $phase in
  data)
    run train --out "$work/shared" --data "$work/data-model" "${common[@]}" --max-steps 1
    run train --out "$work/gt" --data "$work/data-dataset" "${common[@]}" --responses dataset --max-steps 1
    rm -rf "$work/shared" "$work/gt" ;;
  train)
    for v in ${VARIANTS:-shared reduced full kl gt}; do
      case $v in
        shared)  args=(--head shared --data "$work/data-model") ;;
        reduced) args=(--head reduced --draft-vocab 4096 --exit-dim 576 --data "$work/data-model") ;;
        full)    args=(--head full --data "$work/data-model") ;;
        kl)      args=(--head shared --kl-weight 1.0 --data "$work/data-model") ;;
        gt)      args=(--head shared --data "$work/data-dataset" --responses dataset) ;;
      esac
      rm -rf "$work/$v"
      run train --out "$work/$v" "${common[@]}" "${args[@]}" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -3
    done ;;
  eval)
    for v in ${VARIANTS:-shared reduced full kl gt}; do
      run eval-drafter --drafter "$work/$v" --prompts "$data/mt_bench.jsonl" --widths 4 --lengths 5 \
        --max-tokens "${EVAL_TOKENS:-128}" ${LIMIT:+--limit $LIMIT} --out "$work/eval-$v" 2>&1 | tail -3
    done ;;
esac
