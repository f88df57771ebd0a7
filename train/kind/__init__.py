"""Image-kind gate trainer (panoramic / chest / hand / photo / other): ``python -m train.kind``; see ``trainer``.
"""
