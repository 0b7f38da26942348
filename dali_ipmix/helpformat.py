"""The help text of train.py and the ``dali-ipmix`` commands: every default stated once."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help does not say the default itself: None means the
    recipe, the demo, the preset or the checkpoint decides, and the help names those."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
