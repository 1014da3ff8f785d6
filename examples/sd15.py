"""Stable Diffusion 1.5 that refines its own bad outputs; the README quick start runs this.

    python examples/sd15.py [--prompt TEXT] [--out DIR] [--images N]
"""

from _common import run_example

from grefine_hooks import RefinedStableDiffusionPipeline

if __name__ == "__main__":
    run_example(
        RefinedStableDiffusionPipeline,
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "sd15",
        {"num_inference_steps": 30},
    )
