"""Accelerate configs shipped with llm_entreg as package data (llm_entreg.configs); see docs/distributed.md."""
