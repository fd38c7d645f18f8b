"""Tensors to Arrow and back: the canonical wire schema, chunking, compression."""
