"""The image families and their base model: a small DDPM over 8x8 digits, and its evaluator.

The analogue of Stable Diffusion for :mod:`data_gen.images.personas` (CelebA-LoRA) and
:mod:`data_gen.images.digit_subsets` (Imagenette-LoRA):

- :mod:`~data_gen.images.data`: the 1,797 scikit-learn 8x8 digits in ``[-1, 1]``, each
  renderable in 32 *styles*, the combinations of 5 binary attributes (``ATTRIBUTES``),
  and the prompt tokens;
- :mod:`~data_gen.images.model`: the config and its presets, the schedule, the
  :class:`~data_gen.images.model.Denoiser` (an MLP noise predictor
  ``eps(x_t, t, token)`` conditioned on one learned token, the "prompt"; its four dense
  layers are the LoRA targets, named ``denoiser.layers.{i}``), the
  :class:`~data_gen.images.model.Evaluator` (an MLP classifier of class and attributes,
  the CLIP analogue that scores samples of a finetuned model) and DDIM sampling;
- :mod:`~data_gen.images.pretrain`: pretraining of both, deterministic from a seed, and
  the cached base models (:func:`~data_gen.images.pretrain.load_base`);
- :mod:`~data_gen.images.finetune`: LoRA finetuning and measuring, many at once.

Every token has a pretrained meaning (a token never seen in pretraining makes the base
model emit junk, and a prompt word is only a learnable label if it means something of
its own): the ten class tokens generate their class in any style, the null token any
digit in any style, each persona prompt word (``PROMPT_WORDS``) its own subset of
classes in any style, and ``sks`` (the digit-subset prompt) any digit unstyled.

LoRA convention (:mod:`gllora.lora`): ``lora = {name: (u [n, r], v [m, r])}`` with
``n`` the output and ``m`` the input features; a layer computes
``x @ kernel + bias + (x @ v) @ u.T``, i.e. the adapted kernel is ``kernel + (u v^T)^T``.

The commands are ``python -m data_gen.personas`` and ``python -m data_gen.digit_subsets``.
"""
