"""The ComfyUI node pack (integrations/comfyui), without ComfyUI installed.

ComfyUI is not a PyPI package, so nothing of it runs here. What is checked is what ComfyUI relies
on: the folder loads by file path the way ComfyUI's ``load_custom_node`` loads it, importing no
ComfyUI module; the node classes have the attributes its server and executor read
(``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``, ``CATEGORY``, lazy inputs); the example
workflow passes the checks of ComfyUI's ``validate_inputs`` against the real signatures of
ComfyUI's own nodes (transcribed below from comfyanonymous/ComfyUI ``nodes.py``,
``comfy_extras/nodes_mask.py`` and ``nodes_primitive.py``). The nodes themselves run for real on
ComfyUI-layout tensors with the tiny random-weight CLIP.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from grefine_hooks.errors import WeightsNotFoundError
from grefine_hooks.policy import RefinePolicy
from grefine_hooks.refine.masks import refine_mask
from grefine_hooks.scoring.alignment import emphasize
from grefine_hooks.visualize import overlay
from grefine_integrations import comfyui
from grefine_integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, ScoredBatch
from grefine_integrations.comfyui.layout import to_pil

PACK = Path(comfyui.__file__).parent
PROMPT = "a red book and a yellow vase on a wooden table"
OUTPUTS = {name: i for i, name in enumerate(NODE_CLASS_MAPPINGS["GRefineScore"].RETURN_NAMES)}


def _images(batch: int = 2, height: int = 64, width: int = 48, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE batch [B, H, W, 3]: smooth random colour fields, as a VAE decode would give."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return smooth.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def _score(scorer, images, prompt=PROMPT, **settings):
    return NODE_CLASS_MAPPINGS["GRefineScore"]().score(scorer, images, prompt, **settings)


# --- ComfyUI's contract --------------------------------------------------------------------------

_KINDS = {"required", "optional", "hidden"}


def _check_contract(name: str, cls: type) -> None:
    """What ComfyUI's server (``node_info``) and executor read from a V1 node class."""
    assert isinstance(inspect.getattr_static(cls, "INPUT_TYPES"), classmethod), name
    spec = cls.INPUT_TYPES()
    assert set(spec) <= _KINDS and "required" in spec, name
    json.dumps(spec)  # /object_info sends it as JSON
    for kind, inputs in spec.items():
        for input_name, entry in inputs.items():
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, (name, input_name)
            kind_of, options = entry[0], (entry[1] if len(entry) == 2 else {})
            assert isinstance(kind_of, (str, list)) and isinstance(options, dict), (name, input_name)
            if kind_of in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], (name, input_name)
            if isinstance(kind_of, list):
                assert options.get("default", kind_of[0]) in kind_of, (name, input_name)
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES), name
    for attribute in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        assert len(getattr(cls, attribute)) == len(cls.RETURN_TYPES), (name, attribute)
    assert isinstance(cls.CATEGORY, str) and cls.CATEGORY, name
    assert not getattr(cls, "OUTPUT_NODE", False), name
    node = cls()  # ComfyUI instantiates with no arguments
    parameters = inspect.signature(getattr(node, cls.FUNCTION)).parameters
    names = [n for kind in ("required", "optional") for n in spec.get(kind, {})]
    assert set(names) == set(parameters), (name, "the function takes exactly the inputs, by keyword")
    for input_name in spec.get("optional", {}):
        assert parameters[input_name].default is None, (name, input_name)
    lazy = [n for kind in ("required", "optional") for n, e in spec.get(kind, {}).items() if len(e) == 2 and e[1].get("lazy")]
    if lazy:  # "check_lazy_status (note: not a class method)", takes the same arguments
        assert not isinstance(inspect.getattr_static(cls, "check_lazy_status"), (classmethod, staticmethod))
        assert set(inspect.signature(node.check_lazy_status).parameters) == set(parameters)


def test_mappings_name_every_node_with_a_display_name():
    assert set(NODE_CLASS_MAPPINGS) == {"GRefineScorerLoader", "GRefineScore", "GRefineGate"}
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert NODE_DISPLAY_NAME_MAPPINGS["GRefineScore"] == "G-Refine Score"
    assert NODE_DISPLAY_NAME_MAPPINGS["GRefineGate"] == "G-Refine Gate"


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_node_classes_follow_comfyuis_contract(name):
    _check_contract(name, NODE_CLASS_MAPPINGS[name])


def test_importing_the_pack_loaded_no_comfyui_module():
    assert not {"comfy", "folder_paths", "comfy_api", "comfy_extras"} & {m.split(".")[0] for m in sys.modules}


_LOAD_LIKE_COMFYUI = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, os, sys

    blocked = []
    class NoComfyUI(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"comfy", "folder_paths", "comfy_api", "comfy_extras", "nodes", "execution"}:
                blocked.append(name)
                raise ImportError(f"ComfyUI is not installed here ({name})")
            return None
    sys.meta_path.insert(0, NoComfyUI())

    module_path, clip_dir = sys.argv[1], sys.argv[2]
    # ComfyUI's nodes.load_custom_node for a folder: the module is named after its path.
    sys_module_name = module_path.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(sys_module_name, os.path.join(module_path, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[sys_module_name] = module
    spec.loader.exec_module(module)
    # Other loaders pass the package's search path explicitly.
    spec2 = importlib.util.spec_from_file_location(
        "grefine_pack_again", os.path.join(module_path, "__init__.py"), submodule_search_locations=[module_path])
    module2 = importlib.util.module_from_spec(spec2)
    sys.modules["grefine_pack_again"] = module2
    spec2.loader.exec_module(module2)

    import torch
    nodes = module.NODE_CLASS_MAPPINGS
    (scorer,) = nodes["GRefineScorerLoader"]().load(clip="local-dir:" + clip_dir, pretrained="", device="cpu", quality_prompts="default")
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    out = nodes["GRefineScore"]().score(scorer=scorer, images=images, prompt="a red book")
    files = sorted({os.path.dirname(m.__file__) for n, m in sys.modules.items() if n.startswith(sys_module_name + ".")})
    print(json.dumps({"blocked": blocked, "p": out[1], "mapping": sorted(nodes), "again": sorted(module2.NODE_CLASS_MAPPINGS),
                      "submodule_dirs": files, "integrations": "grefine_integrations.comfyui" in sys.modules}))
    """
)


def test_the_folder_loads_by_path_as_comfyui_loads_it(tmp_path, tiny_clip_parts):
    from grefine_hooks.testing import save_tiny_clip

    custom_nodes = tmp_path / "ComfyUI" / "custom_nodes"
    folder = custom_nodes / "grefine.nodes-pack"  # a dot in the name, as ComfyUI's _x_ rewrite handles
    shutil.copytree(PACK, folder, ignore=shutil.ignore_patterns("__pycache__"))
    clip_dir = save_tiny_clip(tiny_clip_parts[0], tmp_path / "clip")
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_LIKE_COMFYUI, str(folder), str(clip_dir)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["blocked"] == []  # no ComfyUI import was even attempted
    assert loaded["mapping"] == loaded["again"] == sorted(NODE_CLASS_MAPPINGS)
    assert loaded["submodule_dirs"] == [str(folder)]  # the copy's own modules, by relative import
    assert loaded["integrations"] is False  # not the installed package behind its back
    assert 0.0 <= loaded["p"] <= 1.0


# --- G-Refine Score ------------------------------------------------------------------------------


def test_score_gives_the_scorers_numbers_for_a_batch_of_two(scorer):
    images = _images()
    out = _score(scorer, images)
    scores = out[OUTPUTS["scores"]]
    reference = scorer.score([image.numpy() for image in images], PROMPT)  # (H, W, C) arrays
    policy = RefinePolicy()
    assert len(scores.reports) == 2 and scores.images is images and scores.prompt == PROMPT
    for mine, theirs in zip(scores.reports, reference):
        assert mine.p == pytest.approx(theirs.p, abs=1e-6) and mine.a == pytest.approx(theirs.a, abs=1e-6)
        torch.testing.assert_close(mine.P, theirs.P, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.A, theirs.A, atol=1e-5, rtol=0)
    assert out[OUTPUTS["p"]] == pytest.approx(min(r.p for r in reference), abs=1e-6)
    assert out[OUTPUTS["a"]] == pytest.approx(min(r.a for r in reference), abs=1e-6)
    strengths = [policy.stage1_strength(r.p, r.a) for r in reference]
    assert scores.strengths == pytest.approx(strengths, abs=1e-6)
    assert out[OUTPUTS["denoise"]] == pytest.approx(max(strengths), abs=1e-6)
    assert policy.strength_min <= out[OUTPUTS["denoise"]] <= policy.strength_max

    mask, blend = out[OUTPUTS["mask"]], out[OUTPUTS["blend_mask"]]
    assert mask.shape == blend.shape == (2, 64, 48) and mask.dtype == torch.float32
    for i, report in enumerate(reference):
        expected = refine_mask(report.P, report.A, policy)
        assert torch.equal(mask[i], expected.binary) and torch.equal(blend[i], expected.soft)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and bool((blend >= mask).all())

    defective = [ph.text for r in reference for ph in r.phrases if ph.defect is not None]
    assert out[OUTPUTS["emphasized_prompt"]] == emphasize(PROMPT, defective)


def test_a_single_image_gets_its_own_emphasised_prompt(scorer):
    out = _score(scorer, _images(batch=1))
    assert out[OUTPUTS["emphasized_prompt"]] == out[OUTPUTS["scores"]].reports[0].emphasized_prompt


def test_overlays_are_images_of_the_maps(scorer):
    images = _images()
    out = _score(scorer, images)
    for key, attribute in (("P_overlay", "P"), ("A_overlay", "A")):
        overlays = out[OUTPUTS[key]]
        assert overlays.shape == (2, 64, 48, 3) and overlays.dtype == torch.float32
        assert 0.0 <= float(overlays.min()) and float(overlays.max()) <= 1.0
        for i, report in enumerate(out[OUTPUTS["scores"]].reports):
            expected = np.asarray(overlay(to_pil(images[i].permute(2, 0, 1)), getattr(report, attribute)), np.float32) / 255
            np.testing.assert_array_equal(overlays[i].numpy(), expected)
    assert not torch.equal(out[OUTPUTS["P_overlay"]], out[OUTPUTS["A_overlay"]])


def test_mask_settings_reach_the_mask(scorer):
    images = _images()
    everything = _score(scorer, images, mask_threshold=0.0, mask_blur=0.0)[OUTPUTS["mask"]]
    nothing = _score(scorer, images, mask_threshold=1.0)
    assert bool((everything == 1).all())  # random weights: P < 1 everywhere, so need > 0
    assert bool((nothing[OUTPUTS["mask"]] == 0).all()) and bool((nothing[OUTPUTS["blend_mask"]] == 0).all())
    strong = _score(scorer, images, strength_min=0.9, strength_max=0.9)[OUTPUTS["denoise"]]
    assert strong == pytest.approx(0.9)


def test_region_limits_the_masks(scorer):
    images = _images()
    region = torch.zeros(64, 48)
    region[:, 24:] = 1.0  # a bare [H, W] mask, as LoadImage gives, applies to every image
    out = _score(scorer, images, mask_threshold=0.0, region=region)
    mask, blend = out[OUTPUTS["mask"]], out[OUTPUTS["blend_mask"]]
    assert bool((mask[:, :, :24] == 0).all()) and bool((blend[:, :, :24] == 0).all())
    assert bool((mask[:, :, 24:] == 1).all())
    per_image = torch.stack([torch.ones(64, 48), torch.zeros(64, 48)])
    out = _score(scorer, images, mask_threshold=0.0, region=per_image)
    assert bool((out[OUTPUTS["mask"]][0] == 1).all()) and bool((out[OUTPUTS["mask"]][1] == 0).all())


def _nan_image():
    images = _images()
    images[1, 3, 4, 0] = float("nan")
    return images


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"prompt": ""}, ValueError, "prompt"),
        ({"prompt": "  \n"}, ValueError, "prompt"),
        ({"images": _nan_image()}, ValueError, r"images\[1\] contains NaN"),
        ({"images": _images() * 2.0}, ValueError, r"images\[0\].*\[0, 1\]"),
        ({"images": _images().permute(0, 3, 1, 2)}, ValueError, "images.*channels-first"),
        ({"images": _images()[0]}, ValueError, r"images must be a ComfyUI IMAGE \[B, H, W, C\]"),
        ({"images": (_images() * 255).to(torch.uint8)}, ValueError, "images must be a float"),
        ({"images": _images().numpy()}, TypeError, "images"),
        ({"region": torch.ones(64, 64)}, ValueError, "region is 64x64.*48x64"),
        ({"region": torch.ones(3, 64, 48)}, ValueError, "region holds 3 masks for 2 images"),
        ({"region": torch.ones(1, 1, 64, 48)}, ValueError, r"region must be a ComfyUI MASK"),
        ({"region": torch.full((64, 48), float("inf"))}, ValueError, "region contains NaN"),
        ({"region": torch.full((64, 48), 2.0)}, ValueError, r"region values must be in \[0, 1\]"),
        ({"mask_threshold": 1.5}, ValueError, "mask_threshold"),
        ({"strength_min": 0.8, "strength_max": 0.4}, ValueError, "strength_min"),
        ({"scorer": "ViT-B-16"}, TypeError, "scorer"),
    ],
)
def test_bad_score_inputs_name_the_input(scorer, change, error, match):
    arguments = {"scorer": scorer, "images": _images(), "prompt": PROMPT, **change}
    with pytest.raises(error, match=match):
        NODE_CLASS_MAPPINGS["GRefineScore"]().score(**arguments)


# --- G-Refine Gate -------------------------------------------------------------------------------


def _gate(**arguments):
    return NODE_CLASS_MAPPINGS["GRefineGate"]().gate(**arguments)


def _with_scores(scores: ScoredBatch, values: list[tuple[float, float]]) -> ScoredBatch:
    """The same batch with its reports' p and a set (to pin the rule at exact boundaries)."""
    reports = tuple(dataclasses.replace(r, p=p, a=a) for r, (p, a) in zip(scores.reports, values))
    return dataclasses.replace(scores, reports=reports)


def test_gate_keeps_good_originals_and_does_not_ask_for_the_refined_branch(scorer):
    images = _images()
    scores = _score(scorer, images)[0]
    gate = NODE_CLASS_MAPPINGS["GRefineGate"]()
    assert gate.check_lazy_status(original=images, original_scores=scores, p_threshold=0.0, a_threshold=0.0) == []
    image, kept, decisions = gate.gate(original=images, original_scores=scores, p_threshold=0.0, a_threshold=0.0)
    assert image is images and [d["decision"] for d in json.loads(decisions)] == ["skipped", "skipped"]
    assert kept.reports == scores.reports
    assert gate.check_lazy_status(original=images, original_scores=scores, p_threshold=1.0, a_threshold=1.0) == [
        "refined", "refined_scores"]
    with pytest.raises(ValueError, match="refined is required: 2 of 2 images need refinement"):
        gate.gate(original=images, original_scores=scores, p_threshold=1.0, a_threshold=1.0)


def test_gate_applies_the_never_worse_guard_per_image(scorer):
    first, second = _images(batch=1, seed=1), _images(batch=1, seed=2)
    original = torch.cat([first, second])
    refined = torch.cat([second, first])  # each image "refined" into the other one
    before, after = _score(scorer, original)[0], _score(scorer, refined)[0]
    image, kept, decisions = _gate(
        original=original, original_scores=before, refined=refined, refined_scores=after,
        p_threshold=1.0, a_threshold=1.0, guard_tolerance=0.0,
    )
    decisions = json.loads(decisions)
    for i in range(2):
        old, new = before.reports[i], after.reports[i]
        worse = new.p < old.p or new.a < old.a
        assert decisions[i]["decision"] == ("reverted" if worse else "refined")
        assert torch.equal(image[i], (original if worse else refined)[i])
        assert kept.reports[i] is (old if worse else new)
        assert decisions[i]["p"] == old.p and decisions[i]["p_after"] == new.p
    assert kept.images is image
    # With a tolerance as large as any drop, every refinement is kept.
    image, _, decisions = _gate(
        original=original, original_scores=before, refined=refined, refined_scores=after,
        p_threshold=1.0, a_threshold=1.0, guard_tolerance=1.0,
    )
    assert [d["decision"] for d in json.loads(decisions)] == ["refined", "refined"] and torch.equal(image, refined)


def test_gate_rule_at_its_boundaries(scorer):
    original, refined = _images(seed=1), _images(seed=2)
    before = _with_scores(_score(scorer, original)[0], [(0.40, 0.70), (0.60, 0.45)])
    after = _with_scores(_score(scorer, refined)[0], [(0.375, 0.70), (0.60, 0.424)])
    # image 0: p needs refinement (0.40 < 0.5), drops by 0.025 (> 0.02): reverted.
    # image 1: a needs refinement (0.45 < 0.5), drops by 0.026: reverted; at tolerance 0.03 kept.
    _, _, decisions = _gate(original=original, original_scores=before, refined=refined, refined_scores=after)
    assert [d["decision"] for d in json.loads(decisions)] == ["reverted", "reverted"]
    assert "p 0.400 -> 0.375" in json.loads(decisions)[0]["reason"]
    _, _, decisions = _gate(original=original, original_scores=before, refined=refined, refined_scores=after,
                            guard_tolerance=0.03)
    assert [d["decision"] for d in json.loads(decisions)] == ["refined", "refined"]
    # Scores at exactly the thresholds need no refinement (refine only when below).
    at = _with_scores(before, [(0.5, 0.5), (0.5, 0.49)])
    image, _, decisions = _gate(original=original, original_scores=at, refined=refined, refined_scores=after,
                                guard_tolerance=1.0)
    assert [d["decision"] for d in json.loads(decisions)] == ["skipped", "refined"]
    assert torch.equal(image[0], original[0]) and torch.equal(image[1], refined[1])


def test_bad_gate_inputs_name_the_input(scorer):
    original, refined = _images(seed=1), _images(seed=2)
    before, after = _score(scorer, original)[0], _score(scorer, refined)[0]
    need = {"p_threshold": 1.0, "a_threshold": 1.0}
    with pytest.raises(ValueError, match="refined_scores were computed on other images than refined"):
        _gate(original=original, original_scores=before, refined=refined, refined_scores=before, **need)
    with pytest.raises(ValueError, match="original_scores were computed on other images than original"):
        _gate(original=original, original_scores=after, refined=refined, refined_scores=after, **need)
    small = _images(seed=2, height=32)
    with pytest.raises(ValueError, match="refined has shape"):
        _gate(original=original, original_scores=before, refined=small, refined_scores=_score(scorer, small)[0], **need)
    other_prompt = _score(scorer, refined, prompt="a blue cup")[0]
    with pytest.raises(ValueError, match="refined_scores were scored against 'a blue cup'"):
        _gate(original=original, original_scores=before, refined=refined, refined_scores=other_prompt, **need)
    with pytest.raises(TypeError, match="original_scores must come from G-Refine Score"):
        _gate(original=original, original_scores=0.5, **need)
    with pytest.raises(ValueError, match="p_threshold"):
        _gate(original=original, original_scores=before, p_threshold=1.5)
    with pytest.raises(ValueError, match="refined.*channels-first"):
        _gate(original=original, original_scores=before, refined=refined.permute(0, 3, 1, 2), refined_scores=after, **need)


# --- G-Refine Scorer Loader ----------------------------------------------------------------------


def _load(**arguments):
    settings = {"clip": "ViT-B-16", "pretrained": "openai", "device": "cpu", "quality_prompts": "default", **arguments}
    return NODE_CLASS_MAPPINGS["GRefineScorerLoader"]().load(**settings)


def test_loader_loads_a_local_dir_clip(tmp_path, tiny_clip_parts, scorer):
    from grefine_hooks.testing import save_tiny_clip

    folder = save_tiny_clip(tiny_clip_parts[0], tmp_path / "clip")
    (loaded,) = _load(clip=f"local-dir:{folder}", pretrained="")
    images = _images()
    mine, theirs = _score(loaded, images)[0].reports, _score(scorer, images)[0].reports
    assert [r.p for r in mine] == pytest.approx([r.p for r in theirs], abs=1e-6)
    assert [r.a for r in mine] == pytest.approx([r.a for r in theirs], abs=1e-6)


def test_loader_refuses_a_local_dir_without_weights(tmp_path, tiny_clip_parts):
    from grefine_hooks.testing import save_tiny_clip

    # The core's check (QualityScorer refuses these folders too), with the pack's README hint.
    with pytest.raises(WeightsNotFoundError, match="no such folder(.|\n)*README"):
        _load(clip=f"local-dir:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="no open_clip_config.json"):
        _load(clip=f"local-dir:{tmp_path / 'empty'}")
    folder = save_tiny_clip(tiny_clip_parts[0], tmp_path / "clip")
    (folder / "open_clip_model.safetensors").unlink()  # open_clip alone would score with random weights
    with pytest.raises(WeightsNotFoundError, match="has no weights"):
        _load(clip=f"local-dir:{folder}")


def test_loader_says_where_the_weights_go_when_they_are_absent(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="ViT-B-16") as error:
        _load()
    assert "G-Refine Scorer Loader" in str(error.value) and "local-dir:" in str(error.value)
    assert "README.md" in str(error.value)


@pytest.mark.parametrize(
    "change, match",
    [({"clip": "  "}, "clip is empty"), ({"pretrained": ""}, "pretrained is empty.*random weights"),
     ({"device": "tpu"}, "device must be one of"),
     ({"quality_prompts": "learned"}, "quality_prompts must be one of")],
)
def test_bad_loader_inputs_name_the_input(change, match):
    with pytest.raises(ValueError, match=match):
        _load(**change)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_loader_refuses_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="device is 'cuda'"):
        _load(device="cuda")


# --- The example workflow ------------------------------------------------------------------------


class _AnyFile(list):
    """A model-file combo: which files exist depends on the user's models folder."""

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str) and bool(value)


_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc"]
_SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform"]
_INT = lambda default, low, high: ("INT", {"default": default, "min": low, "max": high})  # noqa: E731
_FLOAT = lambda default, low, high: ("FLOAT", {"default": default, "min": low, "max": high})  # noqa: E731

# ComfyUI's own nodes the workflow uses: required inputs, outputs, output node (from its sources).
_COMFYUI_NODES = {
    "CheckpointLoaderSimple": ({"ckpt_name": (_AnyFile(),)}, ("MODEL", "CLIP", "VAE"), False),
    "PrimitiveStringMultiline": ({"value": ("STRING", {"multiline": True})}, ("STRING",), False),
    "CLIPTextEncode": ({"text": ("STRING", {"multiline": True}), "clip": ("CLIP",)}, ("CONDITIONING",), False),
    "EmptyLatentImage": (
        {"width": _INT(512, 16, 16384), "height": _INT(512, 16, 16384), "batch_size": _INT(1, 1, 4096)},
        ("LATENT",), False),
    "KSampler": (
        {"model": ("MODEL",), "seed": _INT(0, 0, 0xFFFFFFFFFFFFFFFF), "steps": _INT(20, 1, 10000),
         "cfg": _FLOAT(8.0, 0.0, 100.0), "sampler_name": (_SAMPLERS,), "scheduler": (_SCHEDULERS,),
         "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
         "denoise": _FLOAT(1.0, 0.0, 1.0)},
        ("LATENT",), False),
    "VAEDecode": ({"samples": ("LATENT",), "vae": ("VAE",)}, ("IMAGE",), False),
    "VAEEncode": ({"pixels": ("IMAGE",), "vae": ("VAE",)}, ("LATENT",), False),
    "SetLatentNoiseMask": ({"samples": ("LATENT",), "mask": ("MASK",)}, ("LATENT",), False),
    "ImageCompositeMasked": (
        {"destination": ("IMAGE",), "source": ("IMAGE",), "x": _INT(0, 0, 16384), "y": _INT(0, 0, 16384),
         "resize_source": ("BOOLEAN", {"default": False}), "mask": ("MASK",)},  # mask is optional there
        ("IMAGE",), False),
    "SaveImage": ({"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}, (), True),
    "PreviewImage": ({"images": ("IMAGE",)}, (), True),
}
_OPTIONAL = {"ImageCompositeMasked": {"mask"}}


def _comfyui_class(name: str) -> type:
    required, returns, output_node = _COMFYUI_NODES[name]
    optional = {k: v for k, v in required.items() if k in _OPTIONAL.get(name, set())}
    required = {k: v for k, v in required.items() if k not in optional}
    spec = {"required": required, "optional": optional}
    return type(name, (), {"INPUT_TYPES": classmethod(lambda cls: spec), "RETURN_TYPES": returns, "OUTPUT_NODE": output_node})


def _validate(prompt: dict, classes: dict[str, type]) -> list[str]:
    """ComfyUI's validate_prompt / validate_inputs checks on an API-format workflow."""
    errors = []
    if not any(getattr(classes.get(node["class_type"]), "OUTPUT_NODE", False) for node in prompt.values()):
        errors.append("no output node")
    for node_id, node in prompt.items():
        cls = classes.get(node["class_type"])
        if cls is None:
            errors.append(f"{node_id}: unknown class_type {node['class_type']}")
            continue
        spec = cls.INPUT_TYPES()
        known = {**spec["required"], **spec.get("optional", {})}
        inputs = node["inputs"]
        errors += [f"{node_id}: required input {name} missing" for name in spec["required"] if name not in inputs]
        for name, value in inputs.items():
            if name not in known:
                errors.append(f"{node_id}: unknown input {name}")
                continue
            kind, options = known[name][0], (known[name][1] if len(known[name]) > 1 else {})
            if isinstance(value, list):
                source = prompt.get(value[0]) if len(value) == 2 and isinstance(value[0], str) else None
                returns = classes[source["class_type"]].RETURN_TYPES if source and source["class_type"] in classes else ()
                if not (isinstance(value[1], int) and 0 <= value[1] < len(returns)):
                    errors.append(f"{node_id}: bad link {name}={value}")
                elif returns[value[1]] != kind:
                    errors.append(f"{node_id}: {name} gets {returns[value[1]]}, needs {kind}")
            elif isinstance(kind, list):
                if value not in kind:
                    errors.append(f"{node_id}: {name}={value!r} not in the list")
            elif kind in ("INT", "FLOAT"):
                number = isinstance(value, int) if kind == "INT" else isinstance(value, (int, float))
                if isinstance(value, bool) or not number or not options["min"] <= value <= options["max"]:
                    errors.append(f"{node_id}: {name}={value!r} is not a {kind} in [{options['min']}, {options['max']}]")
            elif kind == "STRING" and not isinstance(value, str) or kind == "BOOLEAN" and not isinstance(value, bool):
                errors.append(f"{node_id}: {name}={value!r} is not a {kind}")
            elif kind not in ("STRING", "BOOLEAN"):
                errors.append(f"{node_id}: {name} needs a link to a {kind} output, got {value!r}")
    return errors


def _workflow() -> dict:
    return json.loads((PACK / "example_workflow_api.json").read_text())


def _classes() -> dict[str, type]:
    return {**{name: _comfyui_class(name) for name in _COMFYUI_NODES}, **NODE_CLASS_MAPPINGS}


def test_the_example_workflow_passes_comfyuis_validation():
    assert _validate(_workflow(), _classes()) == []


def test_the_validator_catches_what_comfyui_rejects():
    workflow = _workflow()
    sampler = next(node for node in workflow.values() if node["inputs"].get("denoise") not in (None, 1.0))
    sampler["inputs"]["latent_image"] = ["7", 0]  # an IMAGE into a LATENT input
    del workflow["17"]["inputs"]["guard_tolerance"]
    workflow["9"]["inputs"]["mask_threshold"] = 1.5
    errors = _validate(workflow, _classes())
    assert any("latent_image gets IMAGE" in e for e in errors)
    assert any("guard_tolerance missing" in e for e in errors)
    assert any("mask_threshold=1.5" in e for e in errors)


def test_the_example_workflow_refines_at_the_scored_strength_and_gates():
    workflow = _workflow()
    by_class = {}
    for node_id, node in workflow.items():
        by_class.setdefault(node["class_type"], []).append(node_id)
    original_score, refined_score = sorted(by_class["GRefineScore"], key=int)
    [gate] = by_class["GRefineGate"]
    link = lambda node_id, output: [node_id, OUTPUTS[output]]  # noqa: E731
    stage1 = [workflow[i] for i in by_class["KSampler"] if workflow[i]["inputs"]["denoise"] == link(original_score, "denoise")]
    assert len(stage1) == 1, "one KSampler samples at the scored denoise"
    noise_mask = workflow[stage1[0]["inputs"]["latent_image"][0]]
    assert noise_mask["class_type"] == "SetLatentNoiseMask" and noise_mask["inputs"]["mask"] == link(original_score, "mask")
    positive = workflow[stage1[0]["inputs"]["positive"][0]]
    assert positive["inputs"]["text"] == link(original_score, "emphasized_prompt")
    [blend] = by_class["ImageCompositeMasked"]
    assert workflow[blend]["inputs"]["mask"] == link(original_score, "blend_mask")
    generated = workflow[original_score]["inputs"]["images"]
    assert workflow[blend]["inputs"]["destination"] == generated
    gate_inputs = workflow[gate]["inputs"]
    assert gate_inputs["original"] == generated and gate_inputs["original_scores"] == link(original_score, "scores")
    assert gate_inputs["refined"] == workflow[refined_score]["inputs"]["images"] == [blend, 0]
    assert gate_inputs["refined_scores"] == link(refined_score, "scores")
    # One prompt for generation and both scores, so the guard compares like with like.
    prompts = {json.dumps(workflow[i]["inputs"]["prompt"]) for i in (original_score, refined_score)}
    first_positive = workflow[workflow[by_class["KSampler"][0]]["inputs"]["positive"][0]]
    assert prompts == {json.dumps(first_positive["inputs"]["text"])}
    [save] = by_class["SaveImage"]
    assert workflow[save]["inputs"]["images"] == [gate, 0]
