"""torch_tq inside PyTorch training loops: ``TQDataset`` and ``TensorSink``."""
