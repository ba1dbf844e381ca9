"""Pure logic: no I/O, no torch.distributed. Trajectories, span masks, prompts, reward, hindsight."""
