"""The command line and the benchmark suite behind ``torch-tq bench``."""
