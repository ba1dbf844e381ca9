"""Benchmark evaluation: greedy rollouts, EM/F1 per dataset and per question kind."""
