"""Rewards for reasoning RL: answer verification (math-verify in worker processes), format, length and repetition.

No JAX here: this package runs in verification workers and on the host side of the trainer.

    from phi_jax import rewards
    rewards.is_correct("<think>...</think> The answer is \\\\boxed{\\\\frac12}.", "0.5")    # True
    fn = rewards.combine({"length_aware": 1.0})
    scores = rewards.score_batch(fn, completions, golds, lengths=lengths, finished=finished)
"""

from phi_jax.rewards.extract import extract_answer, extract_gold, latex_notation, solution_section
from phi_jax.rewards.length_aware import (LengthAwareRewardConfig, accuracy_term, length_aware_reward,
                                          length_scaled_accuracy)
from phi_jax.rewards.registry import (REWARDS, CombinedReward, FormatReward, LengthAwareReward, RepetitionReward,
                                      combine, correctness, get_reward, score_batch, uses_correctness)
from phi_jax.rewards.repetition import repetition_penalty
from phi_jax.rewards.screen import ScreenConfig, passes_screen, screen_problem
from phi_jax.rewards.think_format import ThinkFormat, format_ok, think_format_ok
from phi_jax.rewards.verifier import (VerifierConfig, VerifierPool, configure, default_config, default_pool,
                                      gold_problem, is_correct, readable_answer, readable_gold, shutdown,
                                      verify_batch)
