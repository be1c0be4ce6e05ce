"""Data: chat rendering with assistant loss masks, sources, packing and batching for the training stages."""

from phi_jax.data.chat import (PHI4_MINI_REASONING_SYSTEM_PROMPT, PHI4_MINI_STOP_TOKENS, PHI4_REASONING_SYSTEM_PROMPT,
                               PHI4_STOP_TOKENS, STOP_TOKENS, THINK_TOKENS, chat_family, render_messages,
                               render_prompt, stop_token_ids, think_token_ids)
