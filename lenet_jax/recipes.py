"""Each model's published training recipe and usual dataset, and named presets on top of them.

``recipe(model_name, preset)`` is what ``scripts/train.py`` starts from; its flags override single
hyperparameters. ``default_dataset(model_name)`` is the dataset a new run trains on unless
``--dataset`` names another (a run records its dataset; the model does not know it).
"""

from __future__ import annotations

import dataclasses

from lenet_jax.train import TrainConfig

# model name -> its default recipe
RECIPES: dict[str, TrainConfig] = {
    # the classic LeNet-5 tutorial recipe: SGD lr 0.01, momentum 0.9, batch 64, 10 epochs
    "lenet5": TrainConfig(),
    "lenet5_relu": TrainConfig(),
    # Adam with a cosine decay takes the small ReLU CNN to 99% (SGD stops near 98%)
    "cnn": TrainConfig(optimizer="adam", lr=1e-3, schedule="cosine", batch_size=64, epochs=6),
    # MiniVGG's CIFAR-10 recipe: Adam lr 4e-4, 14 epochs
    "minivgg": TrainConfig(optimizer="adam", lr=4e-4, batch_size=64, epochs=14),
    # the small ViT: one-cycle Adam with light shifts and rotations, 10 epochs (98.3% on MNIST)
    "vit": TrainConfig(
        optimizer="adam",
        lr=2e-3,
        schedule="onecycle",
        augment_shift=2.0,
        augment_rotate=10.0,
        batch_size=128,
        epochs=10,
    ),
}

# preset name -> hyperparameters that replace the model's recipe
PRESETS: dict[str, dict] = {
    # LeNet-5 to >= 99.2%: one-cycle Adam, label smoothing, light on-device augmentation
    "fast": dict(
        optimizer="adam",
        lr=3e-3,
        schedule="onecycle",
        label_smoothing=0.1,
        augment_shift=2.0,
        augment_rotate=10.0,
        batch_size=128,
        epochs=15,
    ),
}


# model name -> the dataset its recipe is for, where not MNIST
RECIPE_DATASETS: dict[str, str] = {"minivgg": "cifar10"}


def default_dataset(model: str) -> str:
    """The dataset ``model``'s recipe trains on (``"mnist"`` unless ``RECIPE_DATASETS`` says
    otherwise)."""
    return RECIPE_DATASETS.get(model, "mnist")


def recipe(model: str, preset: str | None = None) -> TrainConfig:
    """The ``TrainConfig`` of ``model``'s recipe, with ``preset``'s settings on top.

    Raises:
      ValueError: unknown model or preset (the message lists the choices).
    """
    if model not in RECIPES:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(RECIPES)}")
    config = RECIPES[model]
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        config = dataclasses.replace(config, **PRESETS[preset])
    return config
