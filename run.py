"""Train a model: ``python run.py [--config=PATH ...] [--model=NAME] [--key=value ...]``.

With no arguments, trains TiM4Rec on MovieLens-100K (shipped with RecBole). ``--help`` for more.
"""

from pipeline.cli import train_main

if __name__ == "__main__":
    train_main()
