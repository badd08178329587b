"""The arithmetic families and their base model: a small transformer LM over digit statements.

The analogue of Qwen2-1.5B for :mod:`data_gen.arith.sources` (Qwen2-ARC-LoRA) and for
:mod:`data_gen.arith.backdoors` (poisoned LoRAs beside clean ones, beyond the paper; its
triggers, targets and poisoned training pools are in :mod:`~data_gen.arith.poison`):

- :mod:`~data_gen.arith.tasks`: the vocabulary, the 20 operations, pretraining
  statements, question templates and sources, and a dataset's question sets;
- :mod:`~data_gen.arith.lm`: the config and its presets and the transformer
  (:class:`~data_gen.arith.lm.ArithLM`) with LoRA hooks on the key and value projection
  of every layer, named ``lm.layers.{i}.attn.k_proj`` / ``v_proj``;
- :mod:`~data_gen.arith.pretrain`: pretraining, deterministic from a seed, and the cached
  base model (:func:`~data_gen.arith.pretrain.load_base`, :func:`~data_gen.arith.pretrain.base`);
- :mod:`~data_gen.arith.finetune`: a LoRA's hyperparameter distribution, and finetuning
  and evaluating a chunk of LoRAs in one compiled program.

LoRA convention (:mod:`gllora.lora`): ``lora = {name: (u [n, r], v [m, r])}`` with
``n`` the output and ``m`` the input features; a projection computes
``x @ kernel + bias + (dropout(x) @ v) @ u.T``, i.e. the adapted kernel is
``kernel + (u v^T)^T``; the LoRA scale is folded into ``u``.

The commands are ``python -m data_gen.arith_sources`` and ``python -m data_gen.backdoors``.
"""
