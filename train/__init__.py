"""Learning: k-fold training (DDP via torchrun, AMP on CUDA), metrics, plots, checkpoints -> weights/<task>/.

``train.core.loop`` is the shared k-fold loop; ``train.<task>`` are the task trainers;
``train.synthetic`` writes phantom data; ``train.import_checkpoint`` turns original research
checkpoints into cards. Imports ``tasks``, never ``daemon``.
"""
