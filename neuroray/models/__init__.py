"""Models: the 3D ViT encoder and what is built on it.

- :mod:`neuroray.models.vit3d`  ``ViT3D`` encoder, ``ViTConfig`` / ``build_vit3d``, patchify helpers
- :mod:`neuroray.models.mae`    ``MAE3D`` masked autoencoder, ``MAEConfig`` / ``build_mae3d``
- :mod:`neuroray.models.hog`    HOG targets (scikit-image's HOG, batched in torch)
- :mod:`neuroray.models.unetr`  ``UNETR`` segmentation model, ``load_encoder``, lr-decay groups
- :mod:`neuroray.models.transfer`  2D timm ViT -> ViT3D encoder (``encoder_from_2d``)
- :mod:`neuroray.models.encoder_init`  the one encoder-initialisation path (``EncoderInit``,
  ``init_encoder``: scratch, a pretraining checkpoint, or a 2D ViT)
- :mod:`neuroray.models.segmenter`  ``SEGMENTERS`` registry (``"unetr"``), ``SegmenterConfig``,
  ``build_segmenter``, ``load_segmenter`` (a fine-tuned checkpoint -> network + task / window)
- :mod:`neuroray.models.checkpoint`  the checkpoint contract (``model.pt`` format, load / write)

Checkpoint contract (:mod:`neuroray.models.checkpoint`): every model that contains the encoder
keeps it under the ``encoder.`` key prefix; ``unetr.load_encoder(model, state_dict,
prefix="encoder.")`` loads it into any other.
Submodules are imported explicitly (``from neuroray.models.vit3d import ViT3D``) so that importing
this package stays cheap.
"""
