"""fd-onestep: one-step generators from multi-step diffusion models by FD-loss.

Public names are imported lazily so that ``import fd_onestep`` stays cheap (no diffusers or
transformers import until a pipeline or encoder is actually used).
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # Fréchet math
    "frechet_distance": "fd_onestep.frechet",
    "frechet_distance_to_reference": "fd_onestep.frechet",
    "sqrtm_psd": "fd_onestep.frechet",
    "validate_stats": "fd_onestep.frechet",
    # statistics
    "FeatureMoments": "fd_onestep.moments",
    "ReferenceStats": "fd_onestep.reference_stats",
    # populations and losses
    "Population": "fd_onestep.populations",
    "EMAPopulation": "fd_onestep.populations",
    "QueuePopulation": "fd_onestep.populations",
    "ExactPopulation": "fd_onestep.populations",
    "build_population": "fd_onestep.populations",
    "FDLoss": "fd_onestep.losses",
    "MultiEncoderFDLoss": "fd_onestep.losses",
    # encoders
    "FeatureEncoder": "fd_onestep.encoders",
    "load_encoder": "fd_onestep.encoders",
    "KNOWN_ENCODERS": "fd_onestep.encoders",
    # reference statistics of datasets, evaluation
    "compute_reference_stats": "fd_onestep.dataset_stats",
    "save_reference_stats": "fd_onestep.dataset_stats",
    "import_npz_stats": "fd_onestep.dataset_stats",
    "export_npz_stats": "fd_onestep.dataset_stats",
    "evaluate_images": "fd_onestep.evaluation",
    "evaluate_pipeline": "fd_onestep.evaluation",
    "evaluate_folder": "fd_onestep.evaluation",
    "EvaluationResult": "fd_onestep.evaluation",
    "compare_generators": "fd_onestep.comparison",
    "load_pipeline": "fd_onestep.evaluation",
    # conditioning: adherence, per-class FD, Frechet joint distance
    "adherence": "fd_onestep.conditioning_metrics",
    "ClassConditionalMoments": "fd_onestep.conditioning_metrics",
    "ClassConditionalStats": "fd_onestep.conditioning_metrics",
    "frechet_joint_distance": "fd_onestep.conditioning_metrics",
    "per_class_frechet_distances": "fd_onestep.conditioning_metrics",
    "compute_class_conditional_stats": "fd_onestep.dataset_stats",
    # one-step generators
    "FDOneStepPipeline": "fd_onestep.pipelines.pipeline_fd_onestep",
    "OneStepGenerator": "fd_onestep.onestep",
    "OneStepConditioning": "fd_onestep.pipelines.pipeline_fd_onestep",
    "add_lora_to_denoiser": "fd_onestep.pipelines.pipeline_fd_onestep",
    "denoiser_lora_state_dict": "fd_onestep.pipelines.pipeline_fd_onestep",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fd_onestep' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
