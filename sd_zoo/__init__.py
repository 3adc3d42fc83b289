"""sd_zoo: stochastic-depth ResNets (Huang et al., ECCV 2016) as timm models.

``import sd_zoo`` registers the ``sd_*`` entrypoints with timm's registry, and the published weights as their tags.
"""
from . import pretrained  # noqa: F401  (registers the published weights as tags of the sd_ models)
from ._version import __version__
from .sd_resnet import SDBasicBlock, SDBottleneck, SDResNet
from .stochastic_depth import StochasticDepth, fold_test_scaling, survival_probabilities

__all__ = [
    'SDBasicBlock', 'SDBottleneck', 'SDResNet', 'StochasticDepth', 'fold_test_scaling',
    'survival_probabilities', '__version__',
]
