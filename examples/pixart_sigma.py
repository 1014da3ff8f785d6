"""PixArt-sigma that refines its own bad outputs (grefine-hooks' masked-latent loop).

    python examples/pixart_sigma.py [--prompt TEXT] [--out DIR] [--images N]
"""

from _common import run_example

from grefine_hooks import RefinedPixArtSigmaPipeline

if __name__ == "__main__":
    run_example(RefinedPixArtSigmaPipeline, "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "pixart-sigma", {})
