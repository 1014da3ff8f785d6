"""G-Refine nodes for ComfyUI: drop this folder into ``ComfyUI/custom_nodes/``.

ComfyUI imports the folder by path, so everything inside it is imported relatively; the only
outside dependency is ``grefine_hooks``, installed with pip into ComfyUI's Python. Nothing here
imports ComfyUI itself (``comfy``, ``folder_paths``): the nodes speak its tensor conventions
(``IMAGE`` ``[B, H, W, C]``, ``MASK`` ``[B, H, W]``, both in [0, 1]) and let its own samplers do
the refining. See README.md in this folder and ``example_workflow_api.json``.
"""

try:
    import grefine_hooks  # noqa: F401  (fail here, with the fix, rather than deep inside a node)
except ImportError as error:
    raise ImportError(
        "The G-Refine nodes need the grefine-hooks package in ComfyUI's Python environment: run "
        "`<ComfyUI's python> -m pip install /path/to/grefine-hooks` (see this folder's README.md)"
    ) from error

from .gate import GRefineGate
from .loader import GRefineScorerLoader
from .score import GRefineScore, ScoredBatch

NODE_CLASS_MAPPINGS = {
    "GRefineScorerLoader": GRefineScorerLoader,
    "GRefineScore": GRefineScore,
    "GRefineGate": GRefineGate,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "GRefineScorerLoader": "G-Refine Scorer Loader",
    "GRefineScore": "G-Refine Score",
    "GRefineGate": "G-Refine Gate",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "GRefineGate", "GRefineScore", "GRefineScorerLoader", "ScoredBatch"]
