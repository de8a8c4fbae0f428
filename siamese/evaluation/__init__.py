"""Evaluation of generated image-mask pairs: does the lesion sit where the mask is, and does the data help?"""
