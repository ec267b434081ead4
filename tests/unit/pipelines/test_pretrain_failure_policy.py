"""`clap pretrain`'s failure policy (pipelines.pretrain.fail_fast_policy): a worker group that failed while
building its model, engine or loss (SetupError: the same config fails the same way every time) stops the run at
once; any other worker failure is retried as Ray Train's default policy does, up to scaling.max_failures. The
whole path through Ray Train: tests/integration/test_pretrain_losses.py::test_deterministic_setup_error_is_not_retried
(slow tier)."""
from __future__ import annotations

import ray.train
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from pipelines.pretrain import SetupError, fail_fast_policy


def test_a_setup_error_on_any_rank_is_raised_at_once():
    policy = fail_fast_policy(ray.train.FailureConfig(max_failures=3))
    failed = WorkerGroupError("rank 1 failed", {0: RuntimeError("stopped with its group"),
                                                1: SetupError("rank 1 could not build the model/DeepSpeed engine")})
    assert policy.make_decision(failed) == FailureDecision.RAISE


def test_other_worker_failures_are_retried_up_to_max_failures():
    policy = fail_fast_policy(ray.train.FailureConfig(max_failures=2))
    lost = WorkerGroupError("rank 0 died", {0: RuntimeError("the node was lost")})
    assert [policy.make_decision(lost) for _ in range(3)] == [FailureDecision.RETRY, FailureDecision.RETRY,
                                                               FailureDecision.RAISE]
