"""SDXL base that refines its own bad outputs.

    python examples/sdxl.py [--prompt TEXT] [--out DIR] [--images N]
"""

from _common import run_example

from grefine_hooks import RefinedStableDiffusionXLPipeline

if __name__ == "__main__":
    run_example(
        RefinedStableDiffusionXLPipeline,
        "stabilityai/stable-diffusion-xl-base-1.0",
        "sdxl",
        {"num_inference_steps": 30},
    )
