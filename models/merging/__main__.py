"""`python -m models.merging recipe.yml out/` — our `mergekit-yaml` / `mergekit-multi`, same files in.

    python -m models.merging my_mergekit.yml ./merged --seed 0
    python -m models.merging tinyr1.yml ./merged --model math=./m --model code=./c --intermediate-dir ./steps
"""

import argparse
import json
import logging

from .config import MergeConfigError
from .recipe import load_recipe, run_recipe


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.merging", description=__doc__.split("\n")[0])
    p.add_argument("config", help="a mergekit YAML (one document) or mergekit-multi file (named documents)")
    p.add_argument("out", help="output folder for the final model (HF: safetensors + config + tokenizer)")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE / DELLA / arcee_fusion randomness")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="name a model folder for the recipe's references (repeatable)")
    p.add_argument("--intermediate-dir", help="keep named steps' outputs here (default: temporary, deleted)")
    p.add_argument("--workers", type=int, default=2,
                   help="tensors merged at once (same output for any number; memory grows with it)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    aliases = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--model {item!r}: expected NAME=PATH")
        aliases[name] = path
    try:
        result = run_recipe(load_recipe(args.config), args.out, seed=args.seed, aliases=aliases,
                            workdir=args.intermediate_dir, overwrite=args.overwrite,
                            workers=args.workers)
    except MergeConfigError as err:
        raise SystemExit(f"error: {args.config}: {err}") from None
    except FileExistsError as err:  # never written into without --overwrite
        raise SystemExit(f"error: {err}; pass --overwrite to replace it") from None
    except FileNotFoundError as err:  # an input folder without safetensors weights, a missing recipe file
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
