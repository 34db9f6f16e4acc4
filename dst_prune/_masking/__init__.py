"""Mask mechanics (private): the prune hook, the masked weight, state-dict hooks, parents that read weights,
dense-gradient capture and `SparseTarget`, the live view of one sparse parameter."""
