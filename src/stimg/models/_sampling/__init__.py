"""Active sampling: SCRL policy, rewards, baselines."""

from ._rewards import (
    RewardState,
    RewardWeights,
    coverage_reward,
    dispersion,
    normalise_coordinates,
    spatial_reward,
    type_entropy_reward,
)

__all__ = [
    "RewardState",
    "RewardWeights",
    "SamplingPolicy",
    "coverage_reward",
    "dispersion",
    "normalise_coordinates",
    "spatial_reward",
    "type_entropy_reward",
]


def __getattr__(name: str):
    if name == "SamplingPolicy":  # torch only when the policy is used
        from ._policy import SamplingPolicy

        return SamplingPolicy
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
