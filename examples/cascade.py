"""Stable Cascade that refines its own bad outputs, in the decoder's latent space.

    python examples/cascade.py [--prompt TEXT] [--out DIR] [--images N]
"""

from _common import run_example

from grefine_hooks import RefinedStableCascadeCombinedPipeline

if __name__ == "__main__":
    run_example(
        RefinedStableCascadeCombinedPipeline,
        "stabilityai/stable-cascade",
        "cascade",
        {"num_inference_steps": 10, "prior_num_inference_steps": 20},
    )
