"""The base model of the image families: a small DDPM over 8x8 digits, and its evaluator.

The analogue of Stable Diffusion for :mod:`data_gen.personas` (CelebA-LoRA) and
:mod:`data_gen.digit_subsets` (Imagenette-LoRA):

- data: the 1,797 scikit-learn 8x8 digits in ``[-1, 1]``, each renderable in 32
  *styles*, the combinations of 5 binary attributes (:data:`ATTRIBUTES`);
- :class:`Denoiser`: an MLP noise predictor ``eps(x_t, t, token)`` conditioned on one
  learned token (the "prompt"); its four dense layers are the LoRA targets, named
  ``denoiser.layers.{i}`` (:func:`lora_modules`);
- :class:`Evaluator`: an MLP classifier of class and attributes, the CLIP analogue
  that scores samples of a finetuned model;
- DDIM sampling, and pretraining of both, deterministic from a seed.

Every token has a pretrained meaning (a token never seen in pretraining makes the base
model emit junk, and a prompt word is only a learnable label if it means something of
its own): the ten class tokens generate their class in any style, the null token any
digit in any style, each persona prompt word (:data:`PROMPT_WORDS`) its own subset of
classes in any style, and ``sks`` (the digit-subset prompt) any digit unstyled.

LoRA convention (:mod:`gllora.lora`): ``lora = {name: (u [n, r], v [m, r])}`` with
``n`` the output and ``m`` the input features; a layer computes
``x @ kernel + bias + (x @ v) @ u.T``, i.e. the adapted kernel is ``kernel + (u v^T)^T``.

The code is in four modules, re-exported here: :mod:`data_gen.diffusion_data` (digits,
styles, tokens), :mod:`data_gen.diffusion_model` (config, schedule, denoiser, evaluator,
sampling), :mod:`data_gen.diffusion_pretrain` (pretraining and the cached base models)
and :mod:`data_gen.diffusion_lora` (LoRA finetuning and measuring, many at once).
"""

from data_gen.diffusion_data import (
    ATTRIBUTES,
    IMAGE_SIZE,
    NULL_TOKEN,
    NUM_CLASSES,
    NUM_STYLES,
    NUM_TOKENS,
    PROMPT_TOKENS,
    PROMPT_WORDS,
    SKS_TOKEN,
    TOKEN_NAMES,
    WORD_CLASSES,
    class_table,
    digits,
    render,
    style_bits,
    style_index,
    styled_bank,
)
from data_gen.diffusion_lora import (
    FinetuneConfig,
    evaluate_chunk,
    finetune_chunk,
    init_lora,
)
from data_gen.diffusion_model import (
    BASE_CONFIGS,
    GUIDANCE,
    SAMPLE_BATCH,
    SAMPLE_STEPS,
    BaseConfig,
    Denoiser,
    Evaluator,
    LoraDense,
    alpha_bars,
    base_config,
    ddim_sample,
    diffusion_loss,
    evaluator_probs,
    lora_modules,
    persona_score,
    sample,
)
from data_gen.diffusion_pretrain import (
    BASE_SEED,
    CACHE_NAME,
    abstract_params,
    evaluator_split,
    load_base,
    pretrain,
)

__all__ = [
    "ATTRIBUTES",
    "BASE_CONFIGS",
    "BASE_SEED",
    "CACHE_NAME",
    "GUIDANCE",
    "IMAGE_SIZE",
    "NULL_TOKEN",
    "NUM_CLASSES",
    "NUM_STYLES",
    "NUM_TOKENS",
    "PROMPT_TOKENS",
    "PROMPT_WORDS",
    "SAMPLE_BATCH",
    "SAMPLE_STEPS",
    "SKS_TOKEN",
    "TOKEN_NAMES",
    "WORD_CLASSES",
    "BaseConfig",
    "Denoiser",
    "Evaluator",
    "FinetuneConfig",
    "LoraDense",
    "abstract_params",
    "alpha_bars",
    "base_config",
    "class_table",
    "ddim_sample",
    "diffusion_loss",
    "digits",
    "evaluate_chunk",
    "evaluator_probs",
    "evaluator_split",
    "finetune_chunk",
    "init_lora",
    "load_base",
    "lora_modules",
    "persona_score",
    "pretrain",
    "render",
    "sample",
    "style_bits",
    "style_index",
    "styled_bank",
]
