"""The one exception type users see.

Every error a user can cause (bad file, bad config, mismatched genes…) is raised as
:class:`NeurofmError` with a one-line message that names the problem *and* the fix. Entry points
(`run.py`, the `neurofm` console command) turn it into that line on stderr and exit status 2.
"""


class NeurofmError(Exception):
    """A user-facing error whose message names the problem and how to fix it."""
