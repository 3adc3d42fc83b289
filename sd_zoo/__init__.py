"""sd_zoo: stochastic-depth ResNets (Huang et al., ECCV 2016) as timm models.

``import sd_zoo`` registers the ``sd_*`` entrypoints with timm's registry.
"""
from .sd_resnet import SDBasicBlock, SDBottleneck, SDResNet
from .stochastic_depth import StochasticDepth, fold_test_scaling, survival_probabilities

__version__ = '0.1.0'

__all__ = [
    'SDBasicBlock', 'SDBottleneck', 'SDResNet', 'StochasticDepth', 'fold_test_scaling',
    'survival_probabilities', '__version__',
]
