"""V-PAE distillation (not written yet: the distillation issue).

It will hold both training phases in plain PyTorch loops, as ../shared/spec/method.md describes:
Phase I (stability priming, a DMD gradient against the CFG teacher and a LoRA fake score) and Phase II
(the unified adversarial equilibrium, with discriminator heads reading the EMA generator's hidden states),
on FSDP2, Ulysses sequence parallelism and torch.distributed.checkpoint, launched with torchrun.
"""
