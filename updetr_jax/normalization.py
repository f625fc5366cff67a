"""The ImageNet normalisation of every image the models see, and the luma weights.

``(pixel in [0, 1] - MEAN) / STD`` per RGB channel, as torchvision's ImageNet models and
DETR / UP-DETR. ``GRAY_WEIGHTS``: the RGB -> gray (luma, ITU-R BT.601) weights of the
grayscale and colour-jitter augmentations (``device_augment``, ``ssl_backbone``).
Plain Python tuples with no imports, so that every module can import them: the
TensorFlow host pipelines (``data.augment.normalize``), the TensorFlow-free device code
(``device_augment.normalize``), the pictures (``visualize.denormalize``), the
self-supervised backbone (``ssl_backbone``), the export's metadata and the benchmarks.
"""

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
