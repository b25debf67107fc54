"""The paper's analysis tools: CKA between the layers of models (``cka``, ``features``, ``compare``) and Local
Attribution Maps with the diffusion index (``lam``). Figures in ``plots`` (matplotlib, optional)."""

from .cka import MinibatchCKA, hsic_unbiased, linear_cka, minibatch_cka, rbf_cka
from .compare import CKAResult, compare_models, input_crops
from .features import FeatureCapture, capture_features, layer_names, layers
from .lam import LAMResult, diffusion_index, gini, lam

__all__ = ["CKAResult", "FeatureCapture", "LAMResult", "MinibatchCKA", "capture_features", "compare_models",
           "diffusion_index", "gini", "hsic_unbiased", "input_crops", "lam", "layer_names", "layers", "linear_cka",
           "minibatch_cka", "rbf_cka"]
