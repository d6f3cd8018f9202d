"""Evaluation: scorers, batched latent generation, sweeps, reports."""
