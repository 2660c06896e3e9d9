"""diffusion-trak: per-step data attribution for diffusers models."""
