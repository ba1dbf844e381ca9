"""Print the per-GPU memory table of docs/cluster.md from nemo_sdsearch/layout.py's estimate.

    python scripts/memory_table.py                                  # the Qwen2.5 recipes, as in the docs
    python scripts/memory_table.py qwen25_7b_sd_search trtllm.kv_cache_fraction=0.5   # a recipe, overridden

Arguments with `=` are config overrides applied to every recipe; the others name recipes in conf/.
"""

import sys

from nemo_sdsearch.config import load_config
from nemo_sdsearch.layout import DOC_RECIPES, markdown_table


def recipes_markdown(names=DOC_RECIPES, overrides=()) -> str:
    """The markdown table of docs/cluster.md: `markdown_table` over the named recipes (with overrides)."""
    return markdown_table({f"`{n}`": load_config(n, list(overrides)) for n in names})


def main(argv: list[str]) -> None:
    names = [a for a in argv if "=" not in a] or list(DOC_RECIPES)
    print(recipes_markdown(names, [a for a in argv if "=" in a]))


if __name__ == "__main__":
    main(sys.argv[1:])
