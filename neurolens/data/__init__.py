"""Where the files that ship with neurolens are: the one home of their paths (package-data in pyproject.toml)."""
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
MODEL_CONFIGS = DATA_DIR / "model_configs"          # open_clip JSON configs of the tiny and toy models
NSFW_TERMS = DATA_DIR / "nsfw_terms.txt"            # the caption lexicon (the paper's terms and more)
NSFW_PROMPTS_UNSAFE = DATA_DIR / "nsfw_prompts_unsafe.txt"
NSFW_PROMPTS_SAFE = DATA_DIR / "nsfw_prompts_safe.txt"
CONCEPTS_BUILTIN = DATA_DIR / "concepts" / "builtin.yaml"   # the built-in concept set (NSFW and neutral concepts)
