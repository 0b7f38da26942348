"""train.py's plumbing, kept out of it so that the script reads as its stages top to bottom (as
torchvision's references/classification keeps train.py and utils.py apart).  Each module's
docstring says what it owns; docs/architecture.md "Modules" lists them, README "Training" and
"Faults" describe what they do for a run.
"""
