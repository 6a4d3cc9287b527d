"""Model families the inpainter runs: SD 1.x/2.x/XL, SD3/SD3.5, Flux.1 (dev, schnell, Fill).

See :mod:`deployments.families.base` for what a family provides and ``docs/models.md`` for the
table of what each supports, how it is detected and what is refused.
"""

from deployments.families.base import FamilyRow, LatentFormat, ModelFamily, PromptEncoder, TextConditioning
from deployments.families.loading import FAMILY_NAMES, CheckpointSource, load_family

__all__ = [
    "FAMILY_NAMES",
    "CheckpointSource",
    "FamilyRow",
    "LatentFormat",
    "ModelFamily",
    "PromptEncoder",
    "TextConditioning",
    "load_family",
]
