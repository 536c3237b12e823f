"""Recipes: named functions that return a complete TrainConfig; ``get_recipe(name)`` looks one up."""

from __future__ import annotations

from typing import Callable, Dict

from acemath_mcore.recipes import rm, sft
from acemath_mcore.recipes.config import TrainConfig, apply_overrides

RECIPES: Dict[str, Callable[[], TrainConfig]] = {
    name: function
    for module in (sft, rm)
    for name, function in vars(module).items()
    if callable(function) and not name.startswith("_") and getattr(function, "__module__", "") == module.__name__
    and function.__annotations__.get("return") in (TrainConfig, "TrainConfig")
}


def recipe_kind(name: str) -> str:
    """``sft`` or ``rm``: which trainer a recipe is for (the module that declares it)."""
    return "rm" if RECIPES[name].__module__ == rm.__name__ else "sft"


def get_recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()


__all__ = ["RECIPES", "TrainConfig", "apply_overrides", "get_recipe", "recipe_kind"]
