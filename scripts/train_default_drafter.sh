#!/usr/bin/env bash
# The recipe behind the packaged default drafter and the recipe comparison (issue 4), as run on the
# lent GPU (see README). Usage: scripts/train_default_drafter.sh PHASE DATA_DIR WORK_DIR
#   PHASE data   : every ShareGPT user turn (earlier turns as context) -> the base model's greedy
#                  response (work/data-model), its sampled one at T = 0.7 (SAMPLED=1: work/data-sampled),
#                  and the dataset's own replies (GT=1: work/data-dataset); REST=1: work/data-sampled-rest
#   PHASE train  : the drafter variants named in VARIANTS, side by side (one alone leaves the GPU idle), each with
#                  the settings its data folder was made with; a finished one is kept (FORCE=1 retrains it),
#                  RESUME=1 continues interrupted ones from their checkpoints
#   PHASE eval   : tokens per step of each variant on MT-Bench's 80 first turns (WIDTHS x LENGTHS,
#                  drafter alone and with the context-lookup beam; replayed along greedy references)
# DATA_DIR holds sharegpt.jsonl.gz and mt_bench.jsonl (scripts/export_prompts.py writes them).
set -euo pipefail
trap 'wait; exit 130' INT   # a stop (Ctrl-C, timeout) waits for the runs to save their checkpoints
phase=$1 data=$2 work=$3
run() { ${MR:-python3 -m mlx_redrafter} "$@"; }   # MR="python3 scripts/mlx_capped.py": several processes on one GPU
prompts=(${MODEL:+--model "$MODEL"} --prompts "${PROMPTS:-$data/sharegpt.jsonl.gz}" --all-turns --num-prompts "${N:-100000}" --max-new-tokens "${TOKENS:-256}"
         --gen-batch-size "${GEN_BATCH:-512}")
data_flags() {  # the settings a finished data folder was made with, so that train takes it as it is
  [ -f "$1/manifest.json" ] || return 0
  python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); c = m["config"]
print("--num-prompts", m["prompts"], "--gen-temp", c["temperature"], "--gen-batch-size", c["batch_size"],
      "--max-new-tokens", c["max_new_tokens"])' "$1/manifest.json"
}
fit=(--epochs "${EPOCHS:-2}" --unroll "${UNROLL:-6}" --holdout "${HOLDOUT:-200}" --batch-size "${BATCH:-32}")
case $phase in
  data)
    run train --out "$work/data-run" --data "$work/data-model" "${prompts[@]}" --data-only
    [ -z "${SAMPLED:-}" ] || run train --out "$work/data-run" --data "$work/data-sampled" "${prompts[@]}" --gen-temp 0.7 --data-only
    # REST=1: sampled replies to the turns a data run of N turns did not reach (export_prompts.py --skip-turns N)
    [ -z "${REST:-}" ] || run train --out "$work/data-run" --data "$work/data-sampled-rest" ${MODEL:+--model "$MODEL"} \
      --prompts "$data/sharegpt-rest.jsonl.gz" --all-turns --num-prompts 100000 --max-new-tokens "${TOKENS:-256}" \
      --gen-batch-size 512 --gen-temp 0.7 --data-only
    [ -z "${GT:-}" ] || run train --out "$work/data-run" --data "$work/data-dataset" "${prompts[@]}" --responses dataset --data-only ;;
  train)
    pids=()
    for v in ${VARIANTS:-r576 r1152 shared full}; do
      case $v in
        r576)   args=(--head reduced --draft-vocab 4096 --exit-dim 576) ;;
        r1152)  args=(--head reduced --draft-vocab 4096 --exit-dim 1152) ;;
        v8k)    args=(--head reduced --draft-vocab 8192 --exit-dim 576) ;;
        shared) args=(--head shared --batch-size 16) ;;   # full-vocabulary logits: half the batch fits
        full)   args=(--head full --batch-size 16) ;;
        kl)     args=(--head reduced --draft-vocab 4096 --exit-dim 576 --kl-weight 1.0) ;;
        gt)     args=(--head reduced --draft-vocab 4096 --exit-dim 576 --responses dataset) ;;
        final-r1152) args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 3 --save-bits 8) ;;
        final-v8k)   args=(--head reduced --draft-vocab 8192 --exit-dim 576 --epochs 3 --save-bits 8) ;;
        # issue 15's levers, each beside the shipped recipe (r1152, 3 epochs) on the same data:
        sampled)     args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 3 --save-bits 8) ;;
        sampled-feat) args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 3 --save-bits 8 --feature-layers 4,15) ;;
        both-feat)   args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 2 --save-bits 8 --feature-layers 4,15
                           --extra-data "$work/data-sampled" --extra-data "$work/data-sampled-rest") ;;
        # the shipped drafter (sampled replies) continued on the greedy replies: 25 M tokens seen, one epoch of training
        greedy-init) args=(--init "${INIT:?INIT=the drafter to continue}" --epochs 1 --lr 3e-4 --save-bits 8) ;;
        both-init)   args=(--init "${INIT:?INIT=the drafter to continue}" --epochs 1 --lr 3e-4 --save-bits 8
                           --extra-data "$work/data-sampled") ;;
        # sampled replies to all 61k turns: the first 30,720 in data-sampled, the rest (sharegpt-rest) in data-sampled-rest
        sampled-all)  args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 3 --save-bits 8
                            --extra-data "$work/data-sampled-rest") ;;
        sampled-all-feat) args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 3 --save-bits 8 --feature-layers 4,15
                            --extra-data "$work/data-sampled-rest") ;;
        # next, one per session (sampled replies to all turns, ~9-13 minutes, then ~5-7 minutes of training alone):
        # a draft vocabulary of 8192 (94.7% of response tokens against 89.4%) stored 4-bit to stay under 10 MB,
        # and a fourth epoch of the shipped recipe
        v8k-feat)     args=(--head reduced --draft-vocab 8192 --exit-dim 1152 --epochs 3 --save-bits 4 --feature-layers 4,15
                            --extra-data "$work/data-sampled-rest") ;;
        feat-4ep)     args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 4 --save-bits 8 --feature-layers 4,15
                            --extra-data "$work/data-sampled-rest") ;;
        init-sampled) args=(--init "${INIT:?INIT=the drafter to continue}" --epochs 1 --lr 3e-4 --save-bits 8
                            --extra-data "$work/data-sampled-rest") ;;
        # KL to the base's top-32 and per-position loss weights (0.8**k), each beside sampled-feat on the same data
        # (EXTRA="--extra-data WORK/data-sampled-rest" for all 61k turns)
        feat-kl)      args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 3 --save-bits 8 --feature-layers 4,15
                            --kl-weight 1.0) ;;
        # feat-decay-D: weights D^k (feat-decay-0.9); feat-decay alone: 0.8
        feat-decay*)  d=${v#feat-decay}; d=${d#-}
                      args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 3 --save-bits 8 --feature-layers 4,15
                            --position-decay "${d:-0.8}") ;;
        # prompts the base model wrote itself (`mlx-redrafter prompts`; PROMPTS=that file, data in WORK/data-self):
        # the shipped recipe on them alone, and the shipped drafter continued one epoch on them
        self)         args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 3 --save-bits 8 --feature-layers 4,15) ;;
        self-init)    args=(--init "${INIT:?INIT=the drafter to continue}" --epochs 1 --lr 3e-4 --save-bits 8) ;;
        # prompts it wrote steered by the words they begin with (`prompts --start`, scripts/prompt_starts.txt;
        # PROMPTS=that file, data in WORK/data-steer): alone, and with the unsteered ones of data-self
        steer)        args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 3 --save-bits 8 --feature-layers 4,15) ;;
        steer-self)   args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 3 --save-bits 8 --feature-layers 4,15
                            --extra-data "$work/data-self") ;;
        # the data-size curve: the first K shards of data-sampled (scripts/data_subset.py makes data-size-K)
        size-*)       args=(--head reduced --draft-vocab 4096 --exit-dim 1152 --epochs 3 --save-bits 8) ;;
        *) echo "unknown variant $v"; exit 2 ;;
      esac
      data_dir=$work/data-model; [ "$v" = gt ] && data_dir=$work/data-dataset
      case $v in sampled*|init-sampled|v8k-feat|feat-*) data_dir=$work/data-sampled ;; size-*) data_dir=$work/data-$v ;;
        self*) data_dir=$work/data-self; : "${PROMPTS:?PROMPTS=the file mlx-redrafter prompts wrote (data-self holds its replies)}" ;;
        steer*) data_dir=$work/data-steer; : "${PROMPTS:?PROMPTS=the file prompts --start wrote (data-steer holds its replies)}" ;; esac
      if [ -f "$work/$v/drafter/config.json" ] && [ -z "${FORCE:-}" ]; then   # finished: kept unless FORCE=1
        [ -n "${RESUME:-}" ] || echo "$v: finished in $work/$v, kept (FORCE=1 trains it again)"; continue
      fi
      n=($(data_flags "$data_dir"))
      if [ -n "${RESUME:-}" ] && [ -z "${FORCE:-}" ] && [ -d "$work/$v/checkpoint" ]; then n+=(--resume); else rm -rf "${work:?}/$v"; : > "$work/$v.log"; fi
      run train --out "$work/$v" --data "$data_dir" "${prompts[@]}" "${fit[@]}" "${args[@]}" ${n[@]+"${n[@]}"} ${EXTRA:-} \
        >> "$work/$v.log" 2>&1 &
      pids+=($!)
    done
    failed=0; for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || failed=1; done
    for v in ${VARIANTS:-r576 r1152 shared full}; do tr '\r' '\n' < "$work/$v.log" | grep -v "it/s\]$" | tail -2; done
    exit $failed ;;
  eval)
    for v in ${VARIANTS:-r576 r1152 shared full}; do
      run eval-drafter ${MODEL:+--model "$MODEL"} --drafter "$work/$v" --prompts "$data/mt_bench.jsonl" --widths "${WIDTHS:-4,16}" \
        --lengths "${LENGTHS:-6}" ${NODES:+--nodes $NODES} --lookup both --max-tokens "${EVAL_TOKENS:-256}" ${LIMIT:+--limit $LIMIT} --out "$work/eval-$v" \
        > "$work/eval-$v.log" 2>&1 &
      [ -z "${TEMP:-}" ] || run eval-drafter ${MODEL:+--model "$MODEL"} --drafter "$work/$v" --prompts "$data/mt_bench.jsonl" \
        --widths "${WIDTHS:-4,16}" --lengths "${LENGTHS:-6}" ${NODES:+--nodes $NODES} --lookup on --temp "$TEMP" --max-tokens 128 --every 4 \
        --out "$work/eval-$v-t$TEMP" > "$work/eval-$v-t$TEMP.log" 2>&1 &
    done
    wait
    for v in ${VARIANTS:-r576 r1152 shared full}; do echo "== $v"; cat "$work/eval-$v/acceptance.md" "$work/eval-$v-t${TEMP:-x}/acceptance.md" 2>/dev/null; done ;;
esac
