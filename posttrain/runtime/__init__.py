"""Plumbing under the loop: processes and collectives, the DeepSpeed config, atomic checkpoints,
the phase watchdog, weight sync into rollout engines, LoRA, and run logging."""
