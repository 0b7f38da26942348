"""Image-set generators (mixing-set fractals, a synthetic labelled set).

Kept import-free on purpose: the submodules pull in NumPy/PIL and are imported lazily by the CLI.
"""
