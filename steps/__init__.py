"""ZenML steps: thin, typed wrappers over :mod:`neurofm`. No science lives here."""

import materializers  # noqa: F401  (registers the AnnData materializer for every step's outputs)
