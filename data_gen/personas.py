r"""Generates the personas dataset (CelebA-LoRA analogue; see data_gen.images.personas).

    python -m data_gen.personas --size=quick --out=/tmp/personas
    python -m data_gen.personas --size=paper --out=DIR [--seed=0 --rank=4 --chunk=256]

1,000 (quick) or 3,900 (paper) rank-4 LoRAs of the digit DDPM, each personalised to one
of 320 personas (a digit and 5 style attributes) with random hyperparameters; targets:
quality, attributes, digit and every hyperparameter. ``--rank`` makes the Figure 4
variants (same personas, images, hyperparameters and seeds at another rank).
"""

from data_gen import cli
from experiments import cli as command_line

main = cli.entrypoint("data_gen.images.personas")

if __name__ == "__main__":
    command_line.run(main)
