"""Prompt templates for zero-shot classification, per dataset, with a generic fallback.

Why per dataset: CLIP papers prompt each benchmark with wording that fits its images ("a type of pet" for
Oxford Pets, "a satellite photo" for EuroSAT); a bare class name or a generic photo prompt costs accuracy
there. These lists are short, hand-written ensembles in that spirit (not the published 80-prompt ImageNet
list), so numbers are comparable across our own checkpoints, not digit-for-digit with published tables.

Every template holds one `{}`, filled with the class name by `str.format`. A dataset folder's own
`classes.json` "templates" entry overrides this registry (the synthetic split ships its own).
"""
from __future__ import annotations

GENERIC: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "an image showing a {}.",
)

TEMPLATES: dict[str, tuple[str, ...]] = {
    "imagenet": (
        "a photo of a {}.",
        "a bad photo of a {}.",
        "a cropped photo of the {}.",
        "a low resolution photo of a {}.",
        "a close-up photo of a {}.",
        "a drawing of a {}.",
        "a photo of a large {}.",
        "a photo of a small {}.",
    ),
    "cifar10": (
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a low-resolution photo of the {}.",
        "a pixelated photo of a {}.",
        "a tiny photo of a {}.",
    ),
    "cifar100": (
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a low-resolution photo of the {}.",
        "a pixelated photo of a {}.",
        "a tiny photo of a {}.",
    ),
    "food101": (
        "a photo of {}, a type of food.",
        "a plate of {}.",
        "a close-up photo of {}, a dish.",
    ),
    "flowers102": (
        "a photo of a {}, a type of flower.",
        "a close-up photo of a {} flower.",
        "a {} in bloom.",
    ),
    "stanford_cars": (
        "a photo of a {}, a type of car.",
        "a photo of my {}.",
        "a photo of the {}, parked.",
        "a {} on the road.",
    ),
    "fgvc_aircraft": (
        "a photo of a {}, a type of aircraft.",
        "a photo of the {}, an airplane.",
        "a {} on the runway.",
    ),
    "dtd": (
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a close-up of a {} surface.",
        "something with a {} texture.",
    ),
    "eurosat": (
        "a satellite photo of {}.",
        "an aerial view of {}.",
        "a satellite image showing {}.",
    ),
    "oxford_pets": (
        "a photo of a {}, a type of pet.",
        "a photo of my {}.",
        "a close-up photo of a {}, a pet.",
    ),
    "sun397": (
        "a photo of a {}.",
        "a photo of the {}, a kind of place.",
        "a view of a {}.",
        "a scene showing a {}.",
    ),
    "caltech101": (
        "a photo of a {}.",
        "a drawing of a {}.",
        "a cropped photo of the {}.",
        "a photo of the {} on a plain background.",
    ),
}

# Names the same dataset goes by in torchvision, clip_benchmark and common folder layouts.
ALIASES: dict[str, str] = {
    "imagenet1k": "imagenet", "imagenet_1k": "imagenet", "imagenet_val": "imagenet",
    "cifar_10": "cifar10", "cifar_100": "cifar100",
    "food_101": "food101", "food": "food101",
    "flowers": "flowers102", "flowers_102": "flowers102", "oxford_flowers102": "flowers102",
    "cars": "stanford_cars", "stanfordcars": "stanford_cars",
    "aircraft": "fgvc_aircraft", "fgvcaircraft": "fgvc_aircraft",
    "textures": "dtd",
    "pets": "oxford_pets", "oxfordiiitpet": "oxford_pets", "oxford_iiit_pet": "oxford_pets",
    "sun": "sun397", "sun_397": "sun397",
    "caltech": "caltech101", "caltech_101": "caltech101",
}


def canonical_name(dataset: str) -> str:
    """Registry key for a dataset folder name: lower case, '-' and ' ' as '_', known aliases resolved."""
    key = dataset.strip().lower().replace("-", "_").replace(" ", "_")
    return ALIASES.get(key, key)


def templates_for(dataset: str) -> list[str]:
    """The dataset's templates, or `GENERIC` for a dataset the registry does not know."""
    return list(TEMPLATES.get(canonical_name(dataset), GENERIC))
