"""How the non-zero budget is split across layers (`distributions`) and the initial masks (`initialization`)."""
