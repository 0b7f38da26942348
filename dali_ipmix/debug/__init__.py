"""Debugging tools for the IPMix pipelines: ``dali-ipmix graph`` (the operator graph),
``preview`` (a contact sheet of samples with their random draws), ``stages`` (every chain step
of one batch as images, checked against the reference) and ``doctor`` (versions, devices and
smoke tests).  See docs/debugging.md."""
