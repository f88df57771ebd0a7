"""Osteoporosis trainer (panoramic dental X-rays, EfficientNet): ``python -m train.osteo``; see ``trainer``.
"""
