"""The storage node: Flight handlers, admission and limits, batches, start and shutdown."""
