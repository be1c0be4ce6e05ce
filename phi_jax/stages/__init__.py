"""What one stage computes per step: a pure loss function over (params, batch, rng) for the shared train step."""
