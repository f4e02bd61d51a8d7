#!/usr/bin/env bash
# Writes the distillation data sets listed in scripts/kept_sets.txt (kept in git history, not the tree) to
# .device/kept/data-TAG.tar, checked against their sha256, for `scripts/gpu_job.sh restore` on the GPU:
# carry [".device/kept"] in a call after the three staging calls (stage and sets together pass 64 MiB).
# Usage: [KEPT=DIR] scripts/kept_sets.sh [TAG...]   (no TAG: every set listed; KEPT: another folder than
# .device/kept, relative to the checkout's root, for sets that pass a call's 64 MiB together: carry each folder
# in its own call, restore DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
commits=() tags=() sums=()
while read -r commit tag sum _ || [ -n "${commit:-}" ]; do
  case $commit in ''|\#*) continue ;; esac
  commits+=("$commit") tags+=("$tag") sums+=("$sum")
done < scripts/kept_sets.txt
for want in "$@"; do
  [[ " ${tags[*]} " == *" $want "* ]] || { echo "no set named $want in scripts/kept_sets.txt (listed: ${tags[*]})"; exit 1; }
done
kept=${KEPT:-.device/kept}
mkdir -p "$kept"
for i in "${!tags[@]}"; do
  tag=${tags[i]} commit=${commits[i]}
  [ $# = 0 ] || [[ " $* " == *" $tag "* ]] || continue
  out=$kept/data-$tag.tar
  if ! git cat-file blob "$commit:data/distill/data-$tag.tar" > "$out.tmp"; then
    rm -f "$out.tmp"; echo "set $tag: data/distill/data-$tag.tar is not in commit $commit of this clone (a shallow clone? git fetch --unshallow)"; exit 1
  fi
  echo "${sums[i]}  $out.tmp" | sha256sum -c --quiet - || { rm -f "$out.tmp"; echo "set $tag: checksum mismatch"; exit 1; }
  mv "$out.tmp" "$out"
  echo "$out ($(du -h "$out" | cut -f1))"
done
