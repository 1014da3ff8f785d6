"""Generate an image with Stable Diffusion 1.5 and score it with G-Refine's PQ-Map and AQ-Map.

Runs offline: with no SD 1.5 or CLIP ViT-B-16 weights in the local Hugging Face cache it uses the
embedded tiny random-weight models (grefine_hooks.testing), which exercise the same code paths
but draw noise, so their scores say nothing about quality.

    python examples/quickstart.py [--prompt TEXT] [--out DIR]
"""

from __future__ import annotations

import os

# Never reach for the network: take real weights from the local cache or fall back to tiny ones.
# (Set HF_HUB_OFFLINE=0 to let diffusers and open_clip download real weights.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from grefine_hooks import QualityScorer  # noqa: E402
from grefine_hooks.testing import tiny_call_kwargs, tiny_clip, tiny_pipeline  # noqa: E402
from grefine_hooks.visualize import overlay  # noqa: E402

MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def load_generator(device: str) -> tuple[StableDiffusionPipeline, dict]:
    """The real SD 1.5 if it is in the local cache, else the tiny one."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    try:
        pipe = StableDiffusionPipeline.from_pretrained(MODEL_ID, torch_dtype=dtype, local_files_only=True)
        return pipe.to(device), {"num_inference_steps": 30}
    except OSError:
        print(f"{MODEL_ID} is not in the local cache: using the embedded tiny SD 1.5 (random weights).")
        return tiny_pipeline("sd15", seed=0).to(device), tiny_call_kwargs("sd15", steps=4)


def load_scorer(device: str) -> QualityScorer:
    """CLIP ViT-B-16/openai if its weights are on disk, else the tiny CLIP."""
    try:
        return QualityScorer("ViT-B-16", "openai", device=device)
    except OSError:
        print("CLIP ViT-B-16/openai weights are not on disk: using the embedded tiny CLIP (random weights).")
        model, preprocess, tokenizer = tiny_clip(seed=0)
        return QualityScorer(model=model, preprocess=preprocess, tokenizer=tokenizer, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="a red book and a yellow vase on a wooden table")
    parser.add_argument("--out", default="out/quickstart")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    pipe, call_kwargs = load_generator(device)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(args.prompt, generator=torch.Generator(device).manual_seed(0), **call_kwargs).images[0]
    report = load_scorer(device).score(image, args.prompt)

    image.save(out / "image.png")
    overlay(image, report.P).save(out / "P.png")
    overlay(image, report.A).save(out / "A.png")
    (out / "report.json").write_text(json.dumps(report.summary(), indent=2))
    print(f"p={report.p:.3f} a={report.a:.3f} phrases={[(ph.text, ph.defect) for ph in report.phrases]}")
    print(f"wrote {out}/image.png, P.png, A.png, report.json")


if __name__ == "__main__":
    main()
