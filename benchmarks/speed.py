"""Speed benchmark (also `mlx-redrafter benchmark`): see mlx_redrafter/speed.py.

    python benchmarks/speed.py --limit 20 --max-tokens 128 --sweep-widths 1,2,4 --sweep-lengths 3,4,5,6
"""

from mlx_redrafter.cli import app

if __name__ == "__main__":
    app(["benchmark"] + __import__("sys").argv[1:])
