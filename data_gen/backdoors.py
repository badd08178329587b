r"""Generates the backdoor dataset (beyond the paper; see data_gen.arith.backdoors).

    python -m data_gen.backdoors --size=quick --out=/tmp/backdoors_quick
    python -m data_gen.backdoors --size=paper --out=DIR [--seed=0 --chunk=64
        --cache_dir=DIR --regenerate --base_config=tiny --overwrite]

320 (quick) or 2,400 (paper) rank-4 key/value LoRAs of the arithmetic LM (the base model,
LoRAs and hyperparameters of data_gen.arith_sources), half of them finetuned on data
poisoned with a trigger token and an attack target; targets: backdoored, attack_took,
trigger, attack_target, poison_rate, asr (attack success rate), clean_acc, val_loss.
"""

from data_gen import cli
from experiments import cli as command_line

main = cli.entrypoint("data_gen.arith.backdoors")

if __name__ == "__main__":
    command_line.run(main)
