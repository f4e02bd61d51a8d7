#!/usr/bin/env bash
# Writes the distillation data sets listed in scripts/kept_sets.txt (kept in git history, not the tree) to
# .device/kept/data-TAG.tar, checked against their sha256, for `scripts/gpu_job.sh restore` on the GPU:
# carry [".device/kept"] in a call after the three staging calls (stage and sets together pass 64 MiB).
# Usage: scripts/kept_sets.sh [TAG...]   (no TAG: every set listed)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/kept
found=0
while read -r commit tag sum _; do
  case $commit in ''|\#*) continue ;; esac
  [ $# = 0 ] || [[ " $* " == *" $tag "* ]] || continue
  out=.device/kept/data-$tag.tar found=$((found + 1))
  git cat-file blob "$commit:data/distill/data-$tag.tar" > "$out.tmp" \
    || { rm -f "$out.tmp"; echo "set $tag: commit $commit is not in this clone (git fetch --unshallow?)"; exit 1; }
  echo "$sum  $out.tmp" | sha256sum -c --quiet - || { rm -f "$out.tmp"; echo "set $tag: checksum mismatch"; exit 1; }
  mv "$out.tmp" "$out" && echo "$out ($(du -h "$out" | cut -f1))"
done < scripts/kept_sets.txt
[ "$found" -gt 0 ] || { echo "no set named $* in scripts/kept_sets.txt"; exit 1; }
