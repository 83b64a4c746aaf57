"""Recommend with a checkpoint: ``python recommend.py --checkpoint=PATH [--users=U1,U2] [--k=10]
[--history=all|test|valid] [--sequences=FILE.jsonl] [--out=FILE.csv] [--key=value ...]``.

``--export-embeddings=FILE.npz`` writes the item embedding table instead. ``--help`` for more.
"""

from pipeline.cli import recommend_main

if __name__ == "__main__":
    recommend_main()
