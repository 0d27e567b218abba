"""DeepHEMNMA stage 2: the ResNet regressor (training on image set 1, prediction for the rest).

Modules: :mod:`.model` (network), :mod:`.targets` (label encoding, losses, metrics),
:mod:`.data` (particles, split, batches), :mod:`.engines` (single / DDP / Horovod),
:mod:`.train` (the training loop, recipes, resume), :mod:`.checkpoint` (file format),
:mod:`.predict` (batched inference into a STAR file), :mod:`.toydata` (a labelled toy set).
"""
