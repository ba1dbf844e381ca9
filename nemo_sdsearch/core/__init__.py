"""Pure logic: no I/O, no torch. Trajectories, span masks, prompts, reward, hindsight, the TARGET line."""
