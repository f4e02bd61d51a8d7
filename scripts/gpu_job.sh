#!/usr/bin/env bash
# Distillation data, training and evaluation on the lent GPU, in calls of at most 10 minutes that resume
# where the last one stopped. Run from the checkout's root after ../shared/device's three staging calls
# (its README), e.g. call 3: bash .device/stage3/bootstrap.sh && bash scripts/gpu_job.sh steer steer 1 520.
# The default drafter's data were two sets, TAG self (seed 0) and steer (seed 1; drawn before prompts shuffled
# the openings by the seed, so today's steer set at seed 1 holds other prompts of the same mix).
#
#   steer TAG SEED SECS   N prompts begun with scripts/prompt_starts.txt's openings (prompts --seed SEED), then the
#                         base model's replies sampled at T = 0.7: $W/TAG-prompts.jsonl.gz and $W/data-TAG
#   self TAG SEED SECS    the same without openings (prompts sampled freely from the user turn)
#   keep TAG...           $OUT/data-TAG.tar (shards and prompts) to bring back; commit them (scripts/kept_sets.txt
#                         says how: in history, not the tree) and carry them later in .device/kept/
#   restore [DIR]         unpack every DIR/*.tar (.device/kept) into $W (scripts/kept_sets.sh writes them there; carry
#                         [DIR] in a call after the staging calls: stage and sets pass 64 MiB together; sets passing
#                         ~48 MiB go in two folders, KEPT=DIR scripts/kept_sets.sh, each carried and restored in its call)
#                         and F.part-I-of-N files (one too large for a call, e.g. a training checkpoint) are joined into F
#                         once every part has come
#   train SECS TAG...     the shipped recipe (scripts/train_default_drafter.sh train, variant steer-self) on the sets
#                         steer and self plus --extra-data of each data-TAG given, into $W/steer-self, resuming its
#                         checkpoint on the same machine (the same TAGs: FORCE=1 starts again); the drafter and the
#                         log are copied to $OUT
#   packing [TAG]         benchmarks/train_packing.py on data-TAG (default steer): training steps with a batch's examples
#                         packed into shared rows against one a row, 8 batches (~1 minute): $OUT/train-packing.json
#   eval DIR SEEDS        the drafter in DIR (or "shipped") on the 80 MT-Bench first turns (EVERY=2: 40), 256 tokens: sampled T = 0.7
#                         with lookup at the GPU default (16 x 8 / 56 nodes), one run per seed (e.g. 0,1,2), and
#                         greedy replayed at 4 x 4, 32 x 6 / 32 and 16 x 8 / 56, with and without lookup; acceptance.json in $OUT
#
# Data and train stop SECS seconds in (SIGINT: the CLI saves what it has) and the same command in the next call
# goes on; give SECS ~60 s less than what the call has left after bootstrap, since a stop may take 30 s more.
# eval has no budget (~2 minutes for 80 prompts on an H100). Environment: W (work folder,
# /root/work), N (prompts per set, 30720), B (rows generated at once, 512; 1024 was no faster per prompt on
# another H200 host, README), MODEL (the GGUF), PROMPTS_FILE (eval's prompts; default the MT-Bench first turns,
# which the device cannot fetch: copy ~/.cache/mlx-redrafter/question.jsonl into a carried folder such as
# .device/bench/ and name it), EVERY (eval's every K-th prompt, 1), MLX_CACHE_GB (train's MLX buffer cache, 32; data keep scripts/mlx_capped.py's 2, eval sets 4).
set -euo pipefail
export PYTHONPATH=/root/site:$PWD PYTHONUNBUFFERED=1
W=${W:-/root/work} N=${N:-30720} B=${B:-512} MODEL=${MODEL-/root/models/SmolLM2-135M-Instruct.Q4_1.gguf}  # MODEL= : the embedded one
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
case ${1:-} in steer|self|train|eval|packing)  # a machine that lost its staging fails here, not minutes into a call
  fix="run the three staging calls first (../shared/device/README.md)"
  python3 -c "import mlx.core" 2> /dev/null || { echo "MLX is missing: $fix"; exit 1; }
  [ -z "$MODEL" ] || [ -f "$MODEL" ] || { echo "no model at $MODEL: $fix"; exit 1; } ;;
esac
mr=(python3 scripts/mlx_capped.py)
m=(${MODEL:+--model "$MODEL"})
budget() {  # SECS COMMAND...: SIGINT at SECS (the CLI saves and stops), SIGKILL 30 s later
  [ "$1" -ge 30 ] || { echo "no time left in this call; run it again to go on"; return 0; }
  timeout --signal=INT --kill-after=30 "$1" "${@:2}" || { rc=$?; [ $rc = 124 ] || [ $rc = 137 ] && echo "stopped at the time budget; run again to go on"; return $rc; }
}

data() {  # TAG SEED SECS [--start-file F]
  local tag=$1 seed=$2 secs=$3; shift 3
  local prompts=$W/$tag-prompts.jsonl.gz end=$((SECONDS + secs))
  [ -f "$prompts" ] || budget "$secs" "${mr[@]}" prompts --out "$prompts" --num "$N" --batch-size "$B" ${m[@]+"${m[@]}"} --seed "$seed" "$@"
  budget $((end - SECONDS)) "${mr[@]}" train --out "$W/data-run-$tag" --data "$W/data-$tag" ${m[@]+"${m[@]}"} --prompts "$prompts" \
    --all-turns --num-prompts "$N" --max-new-tokens 256 --gen-batch-size "$B" --gen-temp 0.7 --data-only  # finished shards are skipped
}

case ${1:?mode: steer, self, keep, restore, train, packing or eval} in
  steer) data "${2:?TAG}" "${3:?SEED}" "${4:?SECS}" --start-file scripts/prompt_starts.txt ;;
  self) data "${2:?TAG}" "${3:?SEED}" "${4:?SECS}" ;;
  keep) shift; for tag in "$@"; do tar -C "$W" -cf "$OUT/data-$tag.tar" "data-$tag" "$tag-prompts.jsonl.gz"; done ;;
  restore)
    kept=${2:-.device/kept}
    ls "$kept"/*.tar > /dev/null 2>&1 || { echo "no $kept/*.tar: run scripts/kept_sets.sh here, carry $kept"; exit 1; }
    for t in "$kept"/*.tar; do tar -C "$W" -xf "$t"; done
    # a file too large for one call's carry comes as F.part-I-of-N in several sets: joined (parts deleted) once all N are here
    while IFS= read -r -d '' first; do
      f=${first%.part-1-of-*} n=${first##*-of-}
      [[ $n =~ ^[1-9][0-9]?$ ]] || { echo "$first: not a part name F.part-I-of-N"; exit 1; }
      parts=(); for i in $(seq 1 "$n"); do parts+=("$f.part-$i-of-$n"); done
      ls "${parts[@]}" > /dev/null 2>&1 || { echo "$f: a part still to come"; continue; }
      { cat "${parts[@]}" > "$f.tmp" && mv "$f.tmp" "$f" && rm "${parts[@]}"; } || { echo "$f: joining its parts failed"; exit 1; }
      echo "$f: joined"
    done < <(find "$W" -name '*.part-1-of-*' -print0)
    ls "$W" ;;
  train)  # the shipped recipe's steer-self variant (data-steer, data-self) plus each data-TAG given; resumes
    secs=${2:?SECS}; shift 2
    extra=(); for tag in "$@"; do extra+=(--extra-data "$W/data-$tag"); done
    # alone on the GPU, so MLX's buffer cache at 32 GB: a step's buffers likely pass mlx_capped.py's 2 GB (with it,
    # 17.5-18.1 steps/s on one H100 host and 25.7 on another: README, "Cost of making a drafter")
    rc=0; budget "$secs" env RESUME=1 FORCE="${FORCE:-}" MLX_CACHE_GB="${MLX_CACHE_GB:-32}" VARIANTS=steer-self PROMPTS="$W/steer-prompts.jsonl.gz" MODEL="$MODEL" \
      MR="${mr[*]}" EXTRA="${extra[*]}" bash scripts/train_default_drafter.sh train .device/data "$W" || rc=$?
    cp "$W/steer-self.log" "$OUT/" 2>/dev/null || true
    [ ! -f "$W/steer-self/drafter/config.json" ] || cp -r "$W/steer-self/drafter" "$OUT/steer-self-drafter"
    exit $rc ;;
  packing) python3 benchmarks/train_packing.py --data "$W/data-${2:-steer}" ${m[@]+"${m[@]}"} --batches 8 \
    --out "$OUT/train-packing.json" ;;
  eval)
    dir=${2:?DIR or shipped} seeds=${3:-0}; d=(); [ "$dir" = shipped ] || d=(--drafter "$dir")
    p=(${m[@]+"${m[@]}"} ${d[@]+"${d[@]}"} ${PROMPTS_FILE:+--prompts "$PROMPTS_FILE"} --every "${EVERY:-1}" --max-tokens 256)
    tag=$(basename "$dir")
    ev() {  # NAME FLAGS...: one evaluation in the background, into $OUT/eval-TAG-NAME (and .log)
      local out=$OUT/eval-$tag-$1; shift
      MLX_CACHE_GB=4 "${mr[@]}" eval-drafter "${p[@]}" "$@" --out "$out" > "$out.log" 2>&1 &
    }
    for s in ${seeds//,/ }; do ev "t0.7-s$s" --widths 16 --lengths 8 --nodes 56 --lookup on --temp 0.7 --seed "$s"; done
    ev 4x4 --widths 4 --lengths 4 --lookup both
    ev 32x6 --widths 32 --lengths 6 --nodes 32 --lookup both
    ev 16x8 --widths 16 --lengths 8 --nodes 56 --lookup both
    rc=0; for pid in $(jobs -p); do wait "$pid" || rc=1; done
    cat "$OUT"/eval-"$tag"-*/acceptance.md || true; rm -f "$OUT"/eval-"$tag"-*/*.png
    [ $rc = 0 ] || { echo "an evaluation failed: see $OUT/eval-$tag-*.log"; exit 1; } ;;
  *) echo "unknown mode $1"; exit 2 ;;
esac
