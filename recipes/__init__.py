"""Recipes shipped with llm_entreg as package data (llm_entreg.recipe_files); see docs/recipes.md."""
