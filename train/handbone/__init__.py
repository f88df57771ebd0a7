"""Hand-bone segmentation trainer, its optuna search and its submission-CSV inference:
``python -m train.handbone``; see ``trainer``.
"""
