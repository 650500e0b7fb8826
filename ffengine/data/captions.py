"""The bundled image-caption set: a small stand-in for CC3M built from the CIFAR-10 demo data.

Conceptual Captions (CC3M) is the usual pre-training corpus of the CLIP backdoor literature:
web images with alt-text captions, distributed as a list of urls and fetched into
img2dataset's tar layout. This module writes the same layout from the bundled CIFAR-10
splits (:mod:`ffengine.data.demo_data`), so the multi-modal path runs without a download:

* each image keeps its original JPEG bytes (``KEY.jpg``);
* its caption (``KEY.txt``) is one of CLIP's 80 ImageNet prompt templates, chosen by a seeded
  hash of its key and filled with its class name ("a blurry photo of a truck.");
* ``KEY.json`` holds img2dataset's metadata (``url`` on one of several benign source domains,
  ``caption``, ``key``, ``width``, ``height``) and ``KEY.cls`` the CIFAR-10 label.

What it is not: real alt-text. Every caption names its image's class, so zero-shot
classification is easy and a backdoor's caption-side signal is clean; the traceback itself
(per-sample gradients, MAD, domains) does not depend on that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from ..attacks.poisoned_encoder import benign_domain
from ..errors import DataError
from .demo_data import CIFAR10_CLASSES, demo_index
from .index import SampleIndex, build_index
from .shards import ShardWriter

# CLIP's 80 prompt templates for ImageNet zero-shot classification, typed in from
# openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb ("imagenet_templates";
# Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
# 2021). open_clip ships the same list as zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES; a
# test checks the two agree.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
SHARD_SIZE = 5000


def template_index(key: str, seed: int = 0) -> int:
    """Which template captions sample ``key``: a seeded hash, so a caption is a function of
    (key, seed) alone, independent of the sample's position."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:4], "little") % len(IMAGENET_TEMPLATES)


def caption_for(key: str, class_name: str, seed: int = 0) -> str:
    """The caption of sample ``key`` showing a ``class_name``."""
    return IMAGENET_TEMPLATES[template_index(key, seed)].format(class_name)


def class_prompts(class_name: str) -> list[str]:
    """All 80 prompts of one class (zero-shot classification averages their embeddings)."""
    return [t.format(class_name) for t in IMAGENET_TEMPLATES]


def write_caption_shards(src: SampleIndex, out_dir: str | Path, prefix: str, seed: int = 0,
                         class_names: Sequence[str] = CIFAR10_CLASSES) -> list[Path]:
    """Write every sample of the labelled index ``src`` into img2dataset-layout shards
    ``out_dir/PREFIX-NNNNNN.tar`` (image bytes unchanged, captions from the templates, urls
    on benign domains). Returns the shard paths."""
    labels = src.labels
    if len(src) and (labels < 0).any():
        bad = int((labels < 0).sum())
        raise DataError(f"{bad} sample(s) of {src.path} have no label; a caption names the "
                        "class, so every sample needs one (KEY.cls).")
    if len(src) and labels.max() >= len(class_names):
        raise DataError(f"label {int(labels.max())} of {src.path} has no class name; "
                        f"{len(class_names)} names were given.")
    out_dir = Path(out_dir)
    paths = []
    for s in range(0, len(src), SHARD_SIZE):
        path = out_dir / f"{prefix}-{s // SHARD_SIZE:06d}.tar"
        with ShardWriter(path) as w:
            for i in range(s, min(s + SHARD_SIZE, len(src))):
                key = src.key(i)
                img = src.image(i)
                caption = src.caption(i)  # a caption already there is kept
                if caption is None:
                    caption = caption_for(key, class_names[int(labels[i])], seed)
                url = f"https://{benign_domain(key)}/{key}.jpg"
                w.write(key, {
                    "jpg": src.image_bytes(i),
                    "txt": caption,
                    "json": {"url": url, "caption": caption, "key": key,
                             "width": int(img.shape[1]), "height": int(img.shape[0])},
                    "cls": int(labels[i]),
                })
        paths.append(path)
    return paths


def build_caption_set(out: str | Path, splits: Sequence[str] = ("train", "test"),
                      seed: int = 0) -> dict[str, SampleIndex]:
    """Build the bundled image-caption set from the CIFAR-10 demo splits.

    Writes ``out/shards/SPLIT-NNNNNN.tar`` and indexes each split into ``out/SPLIT``.
    Returns {split: index}.
    """
    out = Path(out)
    result = {}
    for split in splits:
        paths = write_caption_shards(demo_index(split), out / "shards", split, seed)
        result[split] = build_index(paths, out / split)
    return result


__all__ = ["IMAGENET_TEMPLATES", "build_caption_set", "caption_for", "class_prompts",
           "template_index", "write_caption_shards"]
