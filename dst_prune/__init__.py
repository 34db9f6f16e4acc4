"""dst_prune: dynamic sparse training for any PyTorch model, as a plugin of `torch.nn.utils.prune`."""

from .algorithms import DropAndGrow, SparseAlgorithm, list_methods, register_method
from .api import apply, remove
from .dsmodel import DSModel
from .errors import DSTError
from .exporting import export
from .loading import load_sparse_state_dict
from .masking import DSTMask, is_sparse, pruned_state_dict
from .sparsity import DynamicSparsity

__all__ = [
    "DSModel", "DSTError", "DSTMask", "DropAndGrow", "DynamicSparsity", "SparseAlgorithm", "apply", "export",
    "is_sparse", "list_methods", "load_sparse_state_dict", "pruned_state_dict", "register_method", "remove",
]

__version__ = "0.2.0"
