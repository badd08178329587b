r"""Generates the digit-subsets dataset (Imagenette-LoRA analogue; data_gen.images.digit_subsets).

    python -m data_gen.digit_subsets --size=quick --out=/tmp/digit_subsets
    python -m data_gen.digit_subsets --size=paper --out=DIR    # 1,023 subsets x 2

512 (quick) or 2,046 (paper) rank-32 LoRAs of the digit DDPM, each finetuned on one
image of every class of a random non-empty subset of the 10 digits; targets: class
membership and dataset size.
"""

from data_gen import cli
from experiments import cli as command_line

main = cli.entrypoint("data_gen.images.digit_subsets")

if __name__ == "__main__":
    command_line.run(main)
