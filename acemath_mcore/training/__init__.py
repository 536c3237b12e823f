"""Training: one engine (megatron-core DDP, optimizer, schedules) under thin SFT and reward-model tasks."""
