"""Embedded tasks with verifiable answers, for running the whole recipe without external data.

    from phi_jax.tasks import word_problems
    problems = word_problems.generate(100, seed=0, split="test")
"""

from phi_jax.tasks import word_problems
