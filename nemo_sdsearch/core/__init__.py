"""Pure logic, no torch: trajectories, span masks, prompts, reward, hindsight, the TARGET line; question files and
the one atomic file write (files.py) are its only I/O."""
