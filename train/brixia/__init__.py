"""Brixia trainers (lung/heart segmenter, STN, pose classifier, region scorer): ``python -m train.brixia STAGE``;
see ``trainer``.
"""
