"""Active sampling: the sampler plug-ins (SCRL and baselines), their registry, rewards and policy."""

from ._base import (
    SAMPLERS,
    FunctionSampler,
    Sampler,
    SamplingContext,
    list_samplers,
    make_sampler,
    register_sampler,
    sampler_params,
)
from ._baselines import DiversitySampler, GridSampler, KMeansSampler, RandomSampler, UncertaintySampler
from ._rewards import (
    RewardState,
    RewardWeights,
    coverage_reward,
    dispersion,
    image_coverage_reward,
    normalise_coordinates,
    spatial_reward,
    type_entropy_reward,
)
from ._scrl import SCRLSampler

#: the built-in samplers (``method=`` names of :func:`stimg.tl.active_sample`)
BUILTIN_SAMPLERS = {
    "scrl": SCRLSampler,
    "random": RandomSampler,
    "uncertainty": UncertaintySampler,
    "diversity": DiversitySampler,
    "grid": GridSampler,
    "kmeans": KMeansSampler,
}
for _name, _cls in BUILTIN_SAMPLERS.items():
    register_sampler(_name, _cls, overwrite=True)

__all__ = [
    "BUILTIN_SAMPLERS",
    "SAMPLERS",
    "DiversitySampler",
    "FunctionSampler",
    "GridSampler",
    "KMeansSampler",
    "RandomSampler",
    "RewardState",
    "RewardWeights",
    "SCRLSampler",
    "Sampler",
    "SamplingContext",
    "SamplingPolicy",
    "UncertaintySampler",
    "coverage_reward",
    "dispersion",
    "image_coverage_reward",
    "list_samplers",
    "make_sampler",
    "normalise_coordinates",
    "register_sampler",
    "sampler_params",
    "spatial_reward",
    "type_entropy_reward",
]


def __getattr__(name: str):
    if name == "SamplingPolicy":  # torch only when the policy is used
        from ._policy import SamplingPolicy

        return SamplingPolicy
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
