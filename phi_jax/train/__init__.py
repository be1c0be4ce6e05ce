"""Training core: TrainState, optimizer, the jitted sharded step, Orbax checkpoints and the loop."""

from phi_jax.train.checkpoint import Checkpointer
from phi_jax.train.loop import LoopConfig, Preempted, global_batch, run
from phi_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from phi_jax.train.state import TrainState, abstract_state, create_train_state, param_shardings, state_shardings
from phi_jax.train.step import make_train_step, train_step
