"""PixArt-alpha that refines its own bad outputs (grefine-hooks' masked-latent loop).

    python examples/pixart_alpha.py [--prompt TEXT] [--out DIR] [--images N]
"""

from _common import run_example

from grefine_hooks import RefinedPixArtAlphaPipeline

if __name__ == "__main__":
    run_example(RefinedPixArtAlphaPipeline, "PixArt-alpha/PixArt-XL-2-1024-MS", "pixart-alpha", {})
