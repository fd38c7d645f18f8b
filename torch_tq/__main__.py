"""``python -m torch_tq``: the same as the ``torch-tq`` console script."""

from torch_tq.tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
