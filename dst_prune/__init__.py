"""dst_prune: dynamic sparse training for any PyTorch model, as a plugin of `torch.nn.utils.prune`."""

from . import _moved
from ._masking.hook import DSTMask, is_sparse
from ._masking.state_dict import pruned_state_dict
from .algorithms import DropAndGrow, SparseAlgorithm, list_methods, register_method
from .api import apply, remove
from .compat.dsmodel import DSModel
from .controller import DynamicSparsity
from .errors import DSTError
from .exporting import export
from .loading import load_sparse_state_dict

_moved.install()  # the module paths of 0.2 (dst_prune.sparsity, dst_prune.distributed_checkpoint, ...) still import

__all__ = [
    "DSModel", "DSTError", "DSTMask", "DropAndGrow", "DynamicSparsity", "SparseAlgorithm", "apply", "export",
    "is_sparse", "list_methods", "load_sparse_state_dict", "pruned_state_dict", "register_method", "remove",
]

__version__ = "0.3.0"
