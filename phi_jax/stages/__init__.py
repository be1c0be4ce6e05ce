"""What one stage computes per step: a pure loss function over (params, batch, rng) for the shared train step
(`next_token`, `dpo`, `grpo`); and `pts`, Pivotal Token Search, which makes one-token DPO pairs from a policy's
completions."""
