"""The data a run needs besides the user's own: the generated sets (fractal mixing set, a
synthetic labelled set: ``dali-ipmix fractals``, ``dali-ipmix synth``) and CIFAR as PNG class
folders from a release the user already has (``python -m dali_ipmix.data.cifar``; README
"Adversarial training on CIFAR-10", docs/adversarial.md "CIFAR").

Kept import-free on purpose: the submodules pull in NumPy/PIL and are imported lazily by the CLI.
"""
