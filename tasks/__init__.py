"""What each task is: labels, networks, preprocessing, output decoding.

Imported by both ``daemon`` (serving) and ``train`` (learning) so that a model is defined once.
"""
