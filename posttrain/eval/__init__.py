"""Held-out evaluation: scoring an engine's samples (`evaluate`), pass@k and seed statistics
(`statistics`), the `posttrain eval` command (`command`) and the end-of-run report (`report`)."""
