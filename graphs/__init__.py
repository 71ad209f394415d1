"""Export-friendly torch modules for each piece of a LLaVA-style model (ARCHITECTURE section 3).

They borrow the Hugging Face parameters and write the forward explicitly; `compiler` builds them from a
loaded model and a plan, exports them, and runs them in torch as the reference.
"""

from .embed import EmbedGraph
from .head import HeadGraph
from .layers import MASK_VALUE, DecoderLayer, RMSNorm, RotaryTable
from .prune import PruneGraph
from .selection import Recipe, select, spatial_seeds
from .spec import GraphSpec, TensorSpec
from .stage import StageGraph
from .vision import VisionGraph

__all__ = [
    "MASK_VALUE",
    "DecoderLayer",
    "EmbedGraph",
    "GraphSpec",
    "HeadGraph",
    "PruneGraph",
    "RMSNorm",
    "Recipe",
    "RotaryTable",
    "StageGraph",
    "TensorSpec",
    "VisionGraph",
    "select",
    "spatial_seeds",
]
