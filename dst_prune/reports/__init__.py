"""Reports of a sparse model: the sparsity tables, the reallocation history and its plots."""
