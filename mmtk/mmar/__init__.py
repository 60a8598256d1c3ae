"""MMAR: continuous-token autoregressive image generation and understanding with a per-token diffusion head."""
