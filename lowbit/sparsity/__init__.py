"""2:4 sparsity: masks (magnitude, WANDA), `sparsify_`, the compact Sparse24Weight and sparse
training of MLP linears."""

from lowbit.integrations.checkpoint import register_tensor_class
from lowbit.sparsity.api import Sparse24, sparse_weight, sparsify_, untied_linears
from lowbit.sparsity.calibration import input_channel_norms
from lowbit.sparsity.masks import is_24, magnitude_mask, mask_24, wanda_mask
from lowbit.sparsity.training import (
    InputSparse24Linear,
    SparseTrainingLinear,
    finalize_sparse_training_,
    mlp_down_projections,
    mlp_linears,
    prune_input_24,
    prune_linear_inputs_,
    sparse24_linear,
    sparse_training_,
)
from lowbit.tensors.sparse24 import Sparse24Weight

register_tensor_class(Sparse24Weight)

__all__ = [
    "InputSparse24Linear",
    "Sparse24",
    "Sparse24Weight",
    "SparseTrainingLinear",
    "finalize_sparse_training_",
    "input_channel_norms",
    "is_24",
    "magnitude_mask",
    "mask_24",
    "mlp_down_projections",
    "mlp_linears",
    "prune_input_24",
    "prune_linear_inputs_",
    "sparse24_linear",
    "sparse_training_",
    "sparse_weight",
    "sparsify_",
    "untied_linears",
    "wanda_mask",
]
