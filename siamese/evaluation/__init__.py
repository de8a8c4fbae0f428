"""Evaluation of generated image-mask pairs: does the lesion sit where the mask is, and does the data help?

Segmenter training and prediction, mask metrics, fidelity of generated pairs, FID/KID, diversity and memorisation,
the downstream benchmark, splits and reports. May import ``ldm``, ``cldm``, ``siamese.data`` and the method (for a
checkpoint's first stage as a feature tower); not ``siamese.meddiff``, which builds on it.
"""
