"""dst_prune: dynamic sparse training for any PyTorch model, as a plugin of `torch.nn.utils.prune`."""

from .algorithms import list_methods
from .api import apply, load_sparse_state_dict, remove
from .dsmodel import DSModel
from .errors import DSTError
from .export import export
from .masking import DSTMask, is_sparse
from .sparsity import DynamicSparsity

__all__ = [
    "DSModel", "DSTError", "DSTMask", "DynamicSparsity", "apply", "export", "is_sparse", "list_methods",
    "load_sparse_state_dict", "remove",
]

__version__ = "0.1.0"
