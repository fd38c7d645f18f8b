"""torch_tq inside other tools: ``TQDataset``/``TensorSink`` (PyTorch) and safetensors."""
