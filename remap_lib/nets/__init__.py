"""Stage 2, the networks: CNN backbones with a layer access function (paper Eq. 1).

``backbones``  the registry (EfficientNet-Lite0/1/2, ResNet, ResNeXt, VGG16) as named stages that
               return the maps of the chosen layers in one pass
"""
