"""The recipe reference is generated from the recipe dataclasses: every key has a meaning, docs/recipes.md is
current, and `seekformer pretrain --help` lists the keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from seekformer.training.recipe_docs import documented_classes, field_help, recipe_reference, undocumented

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


@pytest.mark.parametrize("cls", documented_classes(), ids=lambda c: c.__name__)
def test_every_recipe_key_has_a_meaning(cls):
    assert not undocumented(cls), f"add these keys to the `Keys:` block of {cls.__name__}'s docstring"
    assert set(field_help(cls)) <= {f.name for f in dataclasses.fields(cls)}, "a documented key is not a field"


def test_docs_recipes_md_is_current():
    assert DOC.read_text(encoding="utf-8") == recipe_reference(), \
        "docs/recipes.md is stale: run `seekformer recipe-docs --out docs/recipes.md`"


def test_reference_lists_every_section_and_key():
    text = recipe_reference()
    for cls in documented_classes():
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, (cls.__name__, f.name)
    for section in ("`model:`", "`tokenizer:`", "`data:`", "`train:`", "`tasks[]`", "`weighting:`", "`lora:`"):
        assert section in text


def test_pretrain_help_lists_the_keys(capsys):
    from seekformer.cli import main

    try:
        main(["pretrain", "--help"])
    except SystemExit as e:
        assert not e.code
    out = capsys.readouterr().out
    assert "docs/recipes.md" in out
    for key in ("vocab_size", "val_fraction", "keep_checkpoints", "overwrite"):
        assert key in out
