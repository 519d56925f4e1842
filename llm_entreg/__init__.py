"""llm_entreg: entropy regularization for LLM RL fine-tuning on top of Hugging Face TRL."""

__version__ = "0.1.0"
