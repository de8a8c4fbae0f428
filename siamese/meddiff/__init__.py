"""MedDiff-FT (Xie et al., MICCAI 2025) on this framework's base models, trainer and samplers.

- ``maskgen``: the mask generator (a small pixel-space DDPM over binary masks; its config section is
  ``siamese.config.maskgen``).
- ``repair``: healthy-background repair (the non-lesion generator at inference).
- ``filtering``: the quality filter (nearest-real feature similarity in a band).
- ``erosion``: mask erosion of an existing pairs folder (``tutorial_inference.py --erode`` erodes while sampling).

Lesion-focused fine-tuning is a loss region of base pretraining (``cldm.pretrain``, ``pretrain.unet.loss_region``)
and background-preserving generation a denoise wrapper of the samplers (``ldm.model``): they belong to those
layers, which every family uses. May import ``ldm``, ``cldm``, ``siamese.data``, the method and
``siamese.evaluation``.
"""
