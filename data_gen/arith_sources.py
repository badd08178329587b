r"""Generates the arithmetic-sources dataset (Qwen2-ARC-LoRA analogue; see data_gen.arith.sources).

    python -m data_gen.arith_sources --size=quick --out=/tmp/arith_quick
    python -m data_gen.arith_sources --size=paper --out=DIR [--seed=0 --chunk=64
        --cache_dir=DIR --regenerate --base_config=tiny --overwrite]

256 (quick) or 2,000 (paper) rank-4 key/value LoRAs of the small arithmetic LM, each
finetuned on a random subset of 19 question sources with random hyperparameters;
targets: source membership, validation loss, challenge accuracy and the hyperparameters.
"""

from data_gen import cli
from experiments import cli as command_line

main = cli.entrypoint("data_gen.arith.sources")

if __name__ == "__main__":
    command_line.run(main)
