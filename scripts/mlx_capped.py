"""Run the mlx-redrafter CLI with MLX's buffer cache capped (MLX_CACHE_GB, default 2), so that several
processes share one GPU: uncapped, four of them (data generation at batch 1024 beside three trainings)
ran an H200 out of memory; capped, three used 25 GB together.
    MR="python3 scripts/mlx_capped.py" scripts/train_default_drafter.sh train ...
"""
import os
import runpy
import signal
import sys

import mlx_redrafter  # noqa: F401  (before mlx: the fast BLAS on a CPU)
import mlx.core as mx

mx.set_cache_limit(int(float(os.environ.get("MLX_CACHE_GB", "2")) * 2**30))
# a run started in the background (`cmd &` in a script) ignores SIGINT: restore Ctrl-C, which the CLI
# answers by saving its checkpoint, so that `timeout --signal=INT` stops it cleanly
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["mlx_redrafter", *sys.argv[1:]]
runpy.run_module("mlx_redrafter", run_name="__main__", alter_sys=True)
