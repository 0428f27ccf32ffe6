"""The bounds of the sampling arguments: one set of numbers for every layer.

The runtime checks a call's arguments against them
(:class:`~mongars_llm.runtime._params.SamplingParams`), the manifest a role's
defaults (:class:`~mongars_llm.manifest.models.SamplingParameters`), and the
HTTP server answers a request outside them with a 400 (it builds a
``SamplingParams``). They live here, at the bottom of the layers, because the
manifest sits below the runtime and must not import it.

Standard library only.
"""

from __future__ import annotations

__all__ = ["MIN_TEMPERATURE", "SEED_MAX", "SEED_MIN"]

#: the smallest temperature that still samples: below it the logits overflow (0 is greedy)
MIN_TEMPERATURE = 1e-5
#: the seeds torch's generator takes
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
